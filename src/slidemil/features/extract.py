"""Feature extraction: a DataLoader over patch coordinates, batched inference, one h5 per slide.

Worker processes read tiles; each opens the slide once (lazily, after the fork) and keeps the handle
for all its tiles. Tiles are read at the best pyramid level for the patch footprint and resized
straight to the encoder's input size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slidemil.features.encoders.registry import Encoder
from slidemil.slides.reader import open_slide, read_at


class PatchDataset(Dataset):
    def __init__(self, slide_path: str | Path, coords: np.ndarray, size0: int, out_size: int,
                 backend: str = "auto", mpp: float | None = None):
        self.slide_path, self.coords = str(slide_path), np.asarray(coords)
        self.size0, self.out_size, self.backend, self.mpp = int(size0), int(out_size), backend, mpp
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:  # one handle per worker process, opened after the fork
            self._slide = open_slide(self.slide_path, self.backend, self.mpp)
        x, y = self.coords[i]
        tile = read_at(self._slide, int(x), int(y), self.size0, self.out_size)
        return torch.from_numpy(np.require(tile, np.uint8, ["C", "W"])).permute(2, 0, 1)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None
        return state


@torch.no_grad()
def embed_patches(encoder: Encoder, dataset: PatchDataset, device: torch.device, batch_size: int = 64,
                  num_workers: int = 0, on_batch=None) -> np.ndarray:
    """[N, dim] float32 features of every patch, in the order of `dataset.coords`."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    encoder = encoder.to(device).eval()
    out = []
    for batch in loader:
        images = batch.to(device, non_blocking=True).float().div_(255)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = encoder(images)
        else:
            feats = encoder(images)
        out.append(feats.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(out) if out else np.zeros((0, encoder.spec.dim), np.float32)
