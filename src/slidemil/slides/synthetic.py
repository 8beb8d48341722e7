"""Synthetic H&E-like whole-slide images that OpenSlide opens, with ground-truth masks.

Each slide is a tiled, JPEG-compressed, pyramidal TIFF in Aperio's layout (the ImageDescription
carries `MPP`), so OpenSlide reads it as an Aperio slide and tifffile reads the same pixels. Tissue is
pink stroma with small purple nuclei on a white background; tumour regions of positive slides hold
denser, larger and darker nuclei. Beside each slide: `<id>_tissue.png` and `<id>_tumour.png`, the
true masks at 1/`mask_downsample` of level 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from slidemil.utils.io import atomic_path, write_csv

MASK_DOWNSAMPLE = 16


def _blobs(rng, shape, n, radius_range, smooth=6.0, roughness=3.0) -> np.ndarray:
    """A boolean mask of `n` smooth irregular blobs on a grid of `shape` (low resolution)."""
    h, w = shape
    field = np.full(shape, -1.0, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(*radius_range) * h, rng.uniform(*radius_range) * w
        field = np.maximum(field, 1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2)
    noise = ndi.gaussian_filter(rng.normal(size=shape), smooth) * roughness
    return (field + noise) > 0.0


def _stamp_nuclei(img, mask_full, rng, density, radius, colour, jitter=0.08):
    """Paint dark discs (three sizes around `radius`) at random positions inside `mask_full`."""
    ys, xs = np.nonzero(mask_full[::4, ::4])
    if len(ys) == 0:
        return
    h, w = img.shape[:2]
    count = int(len(ys) * 16 * density)
    pick = rng.integers(0, len(ys), count)
    cy = ys[pick] * 4 + rng.integers(0, 4, count)
    cx = xs[pick] * 4 + rng.integers(0, 4, count)
    shade = np.clip(np.asarray(colour, np.float32) * rng.uniform(1 - jitter, 1 + jitter, (count, 1)), 0, 255)
    size_bin = rng.integers(0, 3, count)
    for b, scale in enumerate((0.8, 1.0, 1.25)):
        rad = radius * scale
        r = int(np.ceil(rad))
        oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
        inside = (oy**2 + ox**2) <= rad**2
        oy, ox = oy[inside], ox[inside]
        sel = size_bin == b
        py = np.clip(cy[sel, None] + oy[None], 0, h - 1)
        px = np.clip(cx[sel, None] + ox[None], 0, w - 1)
        img[py, px] = shade[sel][:, None, :].astype(np.uint8)


def render_slide(rng: np.random.Generator, size=(3072, 4096), tumour: bool = False):
    """(rgb uint8 [H, W, 3], tissue mask, tumour mask), masks at level-0 resolution."""
    h, w = size
    low = (h // MASK_DOWNSAMPLE, w // MASK_DOWNSAMPLE)
    tissue_low = _blobs(rng, low, n=3, radius_range=(0.15, 0.28), roughness=4.0)
    tumour_low = np.zeros(low, bool)
    if tumour:
        for _ in range(20):
            cand = _blobs(rng, low, n=1, radius_range=(0.1, 0.16), smooth=4.0, roughness=1.0) & tissue_low
            cand = ndi.binary_erosion(cand, iterations=2)
            if cand.sum() > 0.03 * tissue_low.sum():
                tumour_low = cand
                break
    up = np.ones((MASK_DOWNSAMPLE, MASK_DOWNSAMPLE), bool)
    tissue = np.kron(tissue_low, up).astype(bool)
    tumour_full = np.kron(tumour_low, up).astype(bool)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (242, 242, 240)
    stroma = np.array([232, 160, 196], np.float32)
    texture = ndi.gaussian_filter(rng.normal(size=low), 1.0).astype(np.float32) * 10
    texture = np.asarray(Image.fromarray(texture).resize((w, h), Image.BILINEAR))[..., None]
    img[tissue] = np.clip(stroma + texture, 0, 255).astype(np.uint8)[tissue]
    _stamp_nuclei(img, tissue & ~tumour_full, rng, density=0.0025, radius=3.0, colour=(120, 80, 165))
    if tumour:
        _stamp_nuclei(img, tumour_full, rng, density=0.012, radius=5.5, colour=(62, 30, 105))
    noise = rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return img, tissue_low, tumour_low


def write_pyramidal_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None, tile: int = 256,
                         downsamples=(1, 4, 16), quality: int = 90) -> Path:
    """An Aperio-layout tiled JPEG TIFF; `mpp=None` writes no resolution (to test the missing-mpp path)."""
    path = Path(path)
    w, h = rgb.shape[1], rgb.shape[0]
    desc = f"Aperio Image Library v12.0.0 slidemil-synthetic\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG Q={quality}"
    if mpp is not None:
        desc += f"|AppMag = {round(10 / mpp)}|MPP = {mpp}"
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for i, ds in enumerate(downsamples):
                level = rgb if ds == 1 else np.asarray(
                    Image.fromarray(rgb).resize((rgb.shape[1] // ds, rgb.shape[0] // ds), Image.BILINEAR))
                kwargs = {}
                if mpp is not None:
                    kwargs = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
                tif.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                          photometric="rgb", description=desc if i == 0 else None,
                          subfiletype=0 if i == 0 else 1, metadata=None, **kwargs)
                if i == 0:  # Aperio's second directory: a stripped thumbnail
                    thumb = Image.fromarray(rgb)
                    thumb.thumbnail((768, 768))
                    tif.write(np.asarray(thumb), compression="jpeg", photometric="rgb", metadata=None,
                              subfiletype=1)
    return path


# How a centre's staining differs: optical density scaled per RGB channel (a shifted stain colour)
_CENTRE_OD_GAIN = np.array([-0.35, 0.45, -0.25], np.float32)


def stain_shift(img: np.ndarray, strength: float) -> np.ndarray:
    """`img` as another centre would stain and scan it: each channel's optical density multiplied by
    1 + strength * (-0.35, 0.45, -0.25) (the hue of haematoxylin and eosin moves; the tissue stays)."""
    od = -np.log((img.astype(np.float32) + 1) / 256)
    return np.clip(256 * np.exp(-od * (1 + strength * _CENTRE_OD_GAIN)) - 1, 0, 255).astype(np.uint8)


def make_slide_cohort(out: str | Path, n_patients: int = 8, slides_per_patient=(1, 2), size=(3072, 4096),
                      mpp: float = 0.5, seed: int = 0, n_sites: int = 1, centre_stain: float = 0.0) -> pd.DataFrame:
    """Write `<out>/slides/<id>.tif` (+ masks) and `<out>/labels.csv`; half the patients are positive.
    With `n_sites` > 1 the table gets a `site` column (each site with both classes) and site s's slides
    are stained differently (`stain_shift` with strength s * `centre_stain`)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        positive, site = p % 2 == 1, (p // 2) % n_sites
        for s in range(int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))):
            sid = f"P{p:03d}_S{s}"
            img, tissue, tumour = render_slide(rng, size, tumour=positive)
            if site and centre_stain:
                img = stain_shift(img, site * centre_stain)
            write_pyramidal_tiff(out / "slides" / f"{sid}.tif", img, mpp)
            for name, mask in (("tissue", tissue), ("tumour", tumour)):
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / "slides" / f"{sid}_{name}.png")
            rows.append({"slide_id": sid, "case_id": f"P{p:03d}", "label": "tumour" if positive else "normal"}
                        | ({"site": f"site{site}"} if n_sites > 1 else {}))
    table = pd.DataFrame(rows)
    write_csv(out / "labels.csv", table)
    return table
