"""Stain normalisation of tiles before the encoder, the usual remedy for centre differences.

- Macenko et al. 2009 (ISBI, "A method for normalizing histology slides for quantitative analysis"):
  optical density OD = -log((I + 1) / Io); the tissue pixels' OD (all channels > beta) projected on
  the plane of their two main eigenvectors; the stain vectors are the directions at the alpha and
  100 - alpha percentiles of the angle (haematoxylin first); concentrations by least squares, scaled
  so their 99th percentile matches the target's; the image rebuilt with the target's stain vectors.
- Reinhard et al. 2001 (IEEE CG&A, "Color transfer between images"): each LAB channel standardised
  and given the target's mean and SD.

Both estimate the *source* statistics once per slide (from a sample of its tiles) and then map every
tile with that one transform. torchstain and most pipelines estimate them per tile; on our planted
two-centre test, per-tile Macenko doubled the centre effect in the features (each tile's stain
vectors and 99th percentile follow its own content: a tile full of nuclei is rescaled unlike a tile of
stroma), while per-slide statistics remove the centre's colour and keep the differences between a
slide's tiles, which are the biology. docs/benchmarking.md has the numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import lab2rgb, rgb2lab

from slidemil.errors import InputError

METHODS = ("none", "macenko", "reinhard")
IO, ALPHA, BETA = 240.0, 1.0, 0.15      # Macenko's transmitted light, angle percentile, OD threshold


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / IO)


def macenko_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stain vectors [3, 2], haematoxylin first; 99th-percentile concentrations [2]) of an image."""
    od = _od(rgb)
    tissue = od[(od > BETA).all(1)]
    if len(tissue) < 50:
        raise ValueError(f"only {len(tissue)} stained pixels")
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100 - ALPHA])
    v1, v2 = plane @ [np.cos(lo), np.sin(lo)], plane @ [np.cos(hi), np.sin(hi)]
    stains = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)
    stains *= np.sign(stains.sum(0, keepdims=True))          # OD vectors point into positive density
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, np.percentile(conc, 99, axis=1)


def reinhard_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [3], SD [3]) of the image's LAB channels."""
    lab = rgb2lab(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
    return lab.mean(0), np.maximum(lab.std(0), 1e-6)


STATS = {"macenko": macenko_stats, "reinhard": reinhard_stats}


class StainNormalizer:
    """Maps a slide's tiles to a target image's stain appearance. `fit_source(tiles)` estimates the
    slide's statistics (call once per slide); `normalizer(tile)` maps HxWx3 uint8 -> HxWx3 uint8.
    Picklable: DataLoader workers get a copy with the slide's statistics."""

    def __init__(self, method: str, target: str | Path):
        if method not in STATS:
            raise InputError(f"--stain-norm {method}: choose one of {', '.join(METHODS)}")
        path = Path(target)
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise InputError(f"--stain-target {path}: not a readable image ({exc}); give a PNG/JPEG/TIFF tile "
                             "of well-stained tissue") from None
        self.method, self.target = method, path
        try:
            self.target_stats = STATS[method](image)
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise InputError(f"--stain-target {path}: its stains cannot be estimated ({exc}); choose a tile "
                             "that is mostly stained tissue, not background") from None
        self.source_stats = None

    def fit_source(self, tiles: np.ndarray) -> bool:
        """Estimate the slide's statistics from a sample of its tiles [n, H, W, 3]; False (and the tiles
        left as they are) when the sample holds too little stained tissue."""
        try:
            self.source_stats = STATS[self.method](np.asarray(tiles))
        except (np.linalg.LinAlgError, ValueError):
            self.source_stats = None
        return self.source_stats is not None

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        if self.source_stats is None:
            return tile
        if self.method == "macenko":
            (src, src_max), (dst, dst_max) = self.source_stats, self.target_stats
            conc = np.linalg.lstsq(src, _od(tile).T, rcond=None)[0] * (dst_max / src_max)[:, None]
            out = IO * np.exp(-(dst @ conc)).T
        else:
            (src_mu, src_sd), (dst_mu, dst_sd) = self.source_stats, self.target_stats
            lab = (rgb2lab(tile) - src_mu) / src_sd * dst_sd + dst_mu
            out = lab2rgb(lab) * 255
        return np.clip(out, 0, 255).reshape(tile.shape).astype(np.uint8)
