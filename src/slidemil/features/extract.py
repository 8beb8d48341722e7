"""Feature extraction: batched encoder inference over a dataset of uint8 tiles, bf16 on GPU.

The tiles come from any `Dataset` of uint8 [3, S, S] images (`slidemil.slides.tiles.PatchDataset` for
slides) or any iterable of such batches (`slidemil.slides.tiles.TileStream`, whose workers live across
slides); this module knows encoders, not slides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader, Dataset

from slidemil.features.encoders.registry import Encoder
from slidemil.utils.device import autocast


class ExtractConfig(BaseModel):
    """Settings of the extraction stage (`slidemil extract`; YAML keys = field names)."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = Field("handcrafted", description="Encoder name (see `slidemil encoders`).")
    weights: Optional[str] = Field(None, description="Encoder weights file (.safetensors .bin .pth).")
    download: bool = Field(False, description="Fetch encoder weights from the hub (network).")
    batch_size: int = Field(64, ge=1, description="Tiles per batch.")
    num_workers: int = Field(0, ge=0, description="Tile-reading worker processes.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    float16: bool = Field(False, description="Store features as float16.")
    stain_norm: Literal["none", "macenko", "reinhard"] = Field(
        "none", description="Stain normalisation of each tile before the encoder (torchstain): none | macenko | "
                            "reinhard; recorded in the feature files.")
    stain_target: Optional[str] = Field(None, description="Target image (a tile of well-stained tissue) that "
                                                          "--stain-norm maps every tile to.")

    @model_validator(mode="after")
    def _stain_target(self):
        """A stain normalisation needs its target image."""
        if self.stain_norm != "none" and not self.stain_target:
            raise ValueError(f"--stain-norm {self.stain_norm} needs --stain-target IMAGE (a tile of well-stained "
                             "tissue to match)")
        return self


def embed_patches(encoder: Encoder, dataset: Dataset, device: torch.device, batch_size: int = 64,
                  num_workers: int = 0, on_batch=None) -> np.ndarray:
    """[N, dim] float32 features of every tile of `dataset`, in its order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    return embed_batches(encoder, loader, device, on_batch)


@torch.no_grad()
def embed_batches(encoder: Encoder, batches: Iterable[torch.Tensor], device: torch.device, on_batch=None) -> np.ndarray:
    """[N, dim] float32 features of uint8 [B, 3, S, S] tile batches, in their order."""
    encoder = encoder.to(device).eval()
    out = []
    for batch in batches:
        images = batch.to(device, non_blocking=True).float().div_(255)
        with autocast(device):
            feats = encoder(images)
        out.append(feats.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(out) if out else np.zeros((0, encoder.spec.dim), np.float32)
