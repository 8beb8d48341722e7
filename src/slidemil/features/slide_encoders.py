"""Slide encoders: one embedding per slide from its patch features (`slidemil embed-slides`).

A slide embedding is written as a one-row feature file (`features` [1, D], the slide's id as its name), so
every slidemil stage takes it as it is: `slidemil train --features <slide embeddings>` fits a model on it
and the run's reference baseline, a tuned logistic regression (ridge Cox for survival) on the mean of the
bag, *is* the linear (Cox) probe of the slide embedding, on the same patient-grouped folds.

Registered here are the slide encoders whose published code is a few tensors slidemil can rebuild and load
from a local file with `weights_only=True`:

- `mean`: the mean of the patch features (TRIDENT's `mean-<encoder>`), any patch encoder.
- `chief`: CHIEF's slide branch (Wang et al., "A pathology foundation model for cancer diagnosis and
  prognosis prediction", Nature 2024; hms-dbmi/CHIEF `models/CHIEF.py`, size "small" as TRIDENT builds
  it): h_n = ReLU(W x_n + b) (768 -> 512), gated attention a_n = w_c^T (tanh(W_a h_n) * sigmoid(W_b h_n)),
  WSI_feature = sum_n softmax(a)_n h_n. The anatomic-site text embedding CHIEF adds before its classifier
  is not part of WSI_feature and is left out, as TRIDENT does. It is 512-d: TRIDENT's table says 768, but
  the official WSI_feature is softmax(A) @ h with h 512-d. Its patch encoder is CTransPath (768-d,
  e.g. TRIDENT's `--patch_encoder ctranspath` features).

Not here, and why: TITAN, PRISM, FEATHER and CARE load through `trust_remote_code` (code from the hub runs
on the user's machine; slidemil never executes code shipped with weights), MADELEINE's checkpoint is a
pickle loaded with `weights_only=False` and its configuration lives only in its gated repository, and
Prov-GigaPath's slide encoder needs LongNet with flash-attn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from slidemil.errors import InputError
from slidemil.features.encoders.registry import default_weights_path, fit_state_dict, read_state_dict, weights_help
from slidemil.features.store import check_feature_file, read_attrs, read_features, write_features
from slidemil.utils.io import SAFE_ID_RULE, is_safe_id, safe_child, write_csv
from slidemil.utils.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideEncoderSpec:
    name: str
    builder: Callable[[int], nn.Module]       # patch feature dim -> module mapping [N, D] to [dim]
    patch_encoder: str | None = None          # the patch encoder its weights were trained on (None: any)
    in_dim: int | None = None                 # the patch feature dim it takes (None: any)
    dim: int | None = None                    # its embedding dim (None: the patch feature dim)
    weights_file: str | None = None
    gated: bool = False
    needs_weights: bool = True
    hub_id: str | None = None
    convert: Callable[[dict], dict] | None = None   # the published state dict -> the builder's keys
    reference: str = ""
    extra: dict = field(default_factory=dict)       # url + manual: the page to get the weights from by hand


SLIDE_ENCODERS = Registry("slide encoder")


def register_slide_encoder(spec: SlideEncoderSpec) -> SlideEncoderSpec:
    return SLIDE_ENCODERS.register(spec.name, spec)


class MeanSlide(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(0)


class CHIEFSlide(nn.Module):
    """CHIEF's WSI_feature (module docstring): a projection, gated attention, the attention-weighted sum."""

    def __init__(self, in_dim: int = 768, hidden: int = 512, attn: int = 256):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.attention_a = nn.Linear(hidden, attn)
        self.attention_b = nn.Linear(hidden, attn)
        self.attention_c = nn.Linear(attn, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        a = self.attention_c(torch.tanh(self.attention_a(h)) * torch.sigmoid(self.attention_b(h)))
        return (torch.softmax(a, 0) * h).sum(0)


# CHIEF's state dict (CHIEF(size_arg="small")): attention_net = [Linear, ReLU, Dropout, Attn_Net_Gated]
CHIEF_KEYS = {"attention_net.0.": "fc.", "attention_net.3.attention_a.0.": "attention_a.",
              "attention_net.3.attention_b.0.": "attention_b.", "attention_net.3.attention_c.": "attention_c."}


def chief_keys(state: dict) -> dict:
    """The slide branch's tensors of a CHIEF checkpoint; its classifier, instance classifiers, attention head,
    text projection and organ embeddings (not used by WSI_feature) are dropped."""
    out = {}
    for key, value in state.items():
        for old, new in CHIEF_KEYS.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


register_slide_encoder(SlideEncoderSpec(
    name="mean", builder=lambda dim: MeanSlide(), needs_weights=False,
    reference="mean of the patch features (TRIDENT mean-<encoder>)"))
register_slide_encoder(SlideEncoderSpec(
    name="chief", builder=lambda dim: CHIEFSlide(dim), patch_encoder="ctranspath", in_dim=768, dim=512,
    weights_file="CHIEF_pretraining.pth", convert=chief_keys,
    reference="Wang et al., Nature 2024 (hms-dbmi/CHIEF)",
    extra={"url": "https://drive.google.com/drive/folders/1uRv9A1HuTW5m_pJoyMzdN31bE1i-tDaV", "manual": True,
           "kind": "slide encoder"}))


def available_slide_encoders() -> list[str]:
    return SLIDE_ENCODERS.available()


def create_slide_encoder(name: str, in_dim: int, weights: str | os.PathLike | None = None) -> tuple[nn.Module, str | None]:
    """(module mapping patch features [N, in_dim] to the slide embedding, its weights file or None); without
    weights where they are needed, the error says which file, where from and where to put it."""
    spec = SLIDE_ENCODERS.info(name).obj
    if spec.in_dim is not None and in_dim != spec.in_dim:
        raise InputError(f"slide encoder {name} takes {spec.in_dim}-d {spec.patch_encoder} patch features, not "
                         f"{in_dim}-d ones; extract the patches with {spec.patch_encoder}")
    model = spec.builder(in_dim)
    if not spec.needs_weights:
        return model.eval(), None
    path = Path(weights) if weights else default_weights_path(spec)
    if path is None or not path.is_file():
        raise InputError((f"weights file {weights} does not exist. " if weights else "") + weights_help(spec))
    fit_state_dict(model, spec, read_state_dict(path), str(path))
    return model.eval(), str(path)


def embed_slides(feature_dir: str | Path, out: str | Path, name: str, weights: str | None = None,
                 slide_ids: list[str] | None = None, device: str = "cpu") -> pd.DataFrame:
    """`<out>/<slide_id>.h5` ([1, dim] features) for every feature file of `feature_dir`; a finished file is
    kept (a rerun resumes), a slide that fails is a row of `<out>/embed_slides.csv` with the reason and the
    others go on. Inputs (encoder, weights, the patch encoder and dim of the features) are checked before
    anything is written."""
    feature_dir, out = Path(feature_dir), Path(out)
    spec = SLIDE_ENCODERS.info(name).obj
    if not feature_dir.is_dir():
        raise InputError(f"--features {feature_dir} is not a folder")
    files = {p.stem: p for p in sorted(feature_dir.iterdir())
             if p.suffix in (".h5", ".pt") and not p.name.startswith(".")}
    ids = slide_ids or list(files)
    if not ids:
        raise InputError(f"{feature_dir} holds no feature files (.h5 or .pt)")
    # the features' encoder and dim, from the first readable file (a broken one is that slide's failure)
    first = next((files[s] for s in ids if s in files and check_feature_file(files[s])[1] is None), None)
    if first is None:
        raise InputError(f"{feature_dir}: none of the slides asked for has a readable feature file")
    attrs = read_attrs(first)
    if spec.patch_encoder and attrs.get("encoder") and str(attrs["encoder"]) != spec.patch_encoder:
        raise InputError(f"{first}: features of encoder {attrs['encoder']!r}, but slide encoder {name} was trained on "
                         f"{spec.patch_encoder} features; extract the patches with {spec.patch_encoder}")
    dim = int(attrs.get("embedding_dim") or read_features(first).dim)
    model, used = create_slide_encoder(name, dim, weights)
    model = model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sid in ids:
        try:
            rows.append({"slide_id": sid, **_embed_one(model, sid, files.get(sid), out, name, spec, dim, used, device)})
        except Exception as exc:  # one slide never stops the others
            msg = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            log.warning("slide embedding of %s failed: %s", sid, msg)
            rows.append({"slide_id": sid, "status": "failed", "error": msg})
    table = pd.DataFrame(rows, columns=["slide_id", "status", "error"])
    write_csv(out / "embed_slides.csv", table)
    return table


@torch.no_grad()
def _embed_one(model, sid, path, out: Path, name, spec, dim, weights, device) -> dict:
    if not is_safe_id(sid):
        raise InputError(f"{sid!r} is not usable as a slide id ({SAFE_ID_RULE}): rename the file")
    if path is None:
        raise InputError(f"{sid}: no feature file")
    target = safe_child(out, sid, ".h5")
    if target.is_file() and check_feature_file(target)[1] is None and read_attrs(target).get("encoder") == f"slide:{name}":
        return {"status": "skipped", "error": ""}
    problem = check_feature_file(path)[1]
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    bag = read_features(path)
    if bag.dim != dim:
        raise InputError(f"{path}: {bag.dim}-d features, the others are {dim}-d; extract every slide with one encoder")
    emb = model(torch.from_numpy(np.asarray(bag.features, np.float32)).to(device)).float().cpu().numpy()
    write_features(target, emb[None], np.zeros((1, 2), np.int64),
                   {"encoder": f"slide:{name}", "slide_encoder": name, "slide_encoder_weights": weights,
                    "patch_encoder": str(bag.attrs.get("encoder", "unknown")), "n_patches": int(len(bag.features)),
                    "patch_size_level0": bag.attrs.get("patch_size_level0")})
    return {"status": "done", "error": ""}
