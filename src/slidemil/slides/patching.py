"""Patch grids at a physical resolution, aligned to level 0, kept by tissue fraction.

A patch of `patch_size` px at `target_mpp` covers `patch_size_level0 = round(patch_size * target_mpp /
level0_mpp)` level-0 pixels. The grid starts at the level-0 origin with stride
`patch_size_level0 - overlap_level0` and runs row-major; only patches fully inside the slide are made.
A patch is kept when at least `min_tissue` of its footprint is tissue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slidemil.slides.reader import Slide, require_mpp
from slidemil.slides.tissue import TissueMask
from slidemil.utils.io import atomic_path


class PatchConfig(BaseModel):
    """Settings of the patching stage (`slidemil patch`; YAML keys = field names)."""

    model_config = ConfigDict(extra="forbid")

    target_mpp: Optional[float] = Field(0.5, gt=0, description="Patch resolution in µm/px.")
    magnification: Optional[float] = Field(None, gt=0, description="Patch magnification instead of mpp "
                                                                   "(20 = 0.5 µm/px).")
    patch_size: int = Field(256, ge=8, description="Patch side in px at the target resolution.")
    overlap: int = Field(0, ge=0, description="Overlap in px at the target resolution.")
    min_tissue: float = Field(0.25, ge=0, le=1, description="Keep patches with at least this tissue fraction.")

    @model_validator(mode="after")
    def _check_overlap(self):
        if self.overlap >= self.patch_size:    # a batch-wide setting: refused at once, not slide by slide
            raise ValueError(f"overlap {self.overlap} must be smaller than patch_size {self.patch_size}")
        return self

    def resolved_mpp(self) -> float:
        if self.magnification:
            return 10.0 / float(self.magnification)
        if not self.target_mpp:
            raise ValueError("give --target-mpp or --magnification")
        return float(self.target_mpp)


@dataclass
class PatchGrid:
    coords: np.ndarray        # int64 [N, 2] level-0 (x, y), row-major
    tissue_fraction: np.ndarray
    attrs: dict


def _grid_geometry(slide: Slide, p: PatchConfig) -> dict:
    mpp0 = require_mpp(slide)
    target = p.resolved_mpp()
    downsample = target / mpp0
    size0 = int(round(p.patch_size * downsample))
    overlap0 = int(round(p.overlap * downsample))
    if overlap0 >= size0:
        raise ValueError(f"--overlap {p.overlap} must be smaller than --patch-size {p.patch_size}")
    matching = [i for i, d in enumerate(slide.level_downsamples) if abs(d - downsample) / downsample < 0.01]
    w0, h0 = slide.dimensions
    return {"patch_size": int(p.patch_size), "patch_size_level0": size0, "target_mpp": float(target),
            "level0_mpp": float(mpp0), "target_magnification": 10.0 / target, "level0_magnification": 10.0 / mpp0,
            "overlap": int(p.overlap), "patch_level": int(matching[0]) if matching else 0,
            "downsample": float(downsample), "level0_width": int(w0), "level0_height": int(h0),
            "name": slide.slide_id, "stride_level0": size0 - overlap0,
            "level_dim": [int(w0), int(h0)], "downsampled_level_dim": [int(round(w0 / downsample)),
                                                                         int(round(h0 / downsample))]}


def tissue_fraction(mask: np.ndarray, mask_downsample: float, xs: np.ndarray, ys: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of tissue under each level-0 square (x, y, size0), from an integral image of the mask.

    Each mask pixel (r, c) covers level-0 [c*ds, (c+1)*ds) x [r*ds, (r+1)*ds); a patch counts the
    mask pixels whose centre falls inside it."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    c0 = np.clip(np.ceil(xs / mask_downsample - 0.5), 0, w).astype(int)
    c1 = np.clip(np.ceil((xs + size0) / mask_downsample - 0.5), 0, w).astype(int)
    r0 = np.clip(np.ceil(ys / mask_downsample - 0.5), 0, h).astype(int)
    r1 = np.clip(np.ceil((ys + size0) / mask_downsample - 0.5), 0, h).astype(int)
    total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    return total / area


def make_grid(slide: Slide, tissue: TissueMask, params: PatchConfig) -> PatchGrid:
    geo = _grid_geometry(slide, params)
    size0, stride = geo["patch_size_level0"], geo.pop("stride_level0")
    w0, h0 = slide.dimensions
    xs = np.arange(0, w0 - size0 + 1, stride, dtype=np.int64)
    ys = np.arange(0, h0 - size0 + 1, stride, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    frac = tissue_fraction(tissue.mask, tissue.downsample, gx, gy, size0)
    keep = frac >= params.min_tissue
    coords = np.stack([gx[keep], gy[keep]], 1)
    return PatchGrid(coords, frac[keep], geo)


def write_coords(path: Path, grid: PatchGrid, extra_attrs: dict | None = None) -> Path:
    """`patches/<slide_id>.h5`: dataset `coords` int64 [N, 2] with the attributes below, which
    are also what CLAM (`patch_level`, `patch_size`, `downsample`, `level_dim`) and TRIDENT
    (`patch_size_level0`, `level0_magnification`, `target_magnification`, `overlap`) read."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            ds = fh.create_dataset("coords", data=grid.coords.astype(np.int64).reshape(-1, 2))
            fh.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
            for k, v in {**grid.attrs, **(extra_attrs or {})}.items():
                if v is not None:
                    ds.attrs[k] = v
    return path


def read_coords(path: str | Path) -> tuple[np.ndarray, dict]:
    """Coordinates and attributes from slidemil, TRIDENT (`<id>_patches.h5`) or CLAM coords files."""
    with h5py.File(path, "r") as fh:
        if "coords" not in fh:
            raise ValueError(f"{path}: no 'coords' dataset")
        coords = np.asarray(fh["coords"][()], dtype=np.int64).reshape(-1, 2)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v)
                 for k, v in fh["coords"].attrs.items()}
    return coords, attrs
