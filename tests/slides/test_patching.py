"""Patch grids: patches lie in tissue and follow the physical resolution."""

from __future__ import annotations

import numpy as np

from conftest import tissue_truth
from slidemil.slides.patching import PatchConfig, make_grid, tissue_fraction
from slidemil.slides.reader import open_slide
from slidemil.slides.synthetic import MASK_DOWNSAMPLE, render_slide, write_pyramidal_tiff
from slidemil.slides.tissue import segment_tissue


def test_patches_lie_in_tissue_and_cover_it(slide_cohort):
    sid = "P002_S0"
    slide = open_slide(slide_cohort / "slides" / f"{sid}.tif")
    tissue = segment_tissue(slide)
    grid = make_grid(slide, tissue, PatchConfig(target_mpp=0.5, patch_size=128, min_tissue=0.25))
    truth = tissue_truth(slide_cohort, sid, "tissue")
    size0 = grid.attrs["patch_size_level0"]
    frac = tissue_fraction(truth, MASK_DOWNSAMPLE, grid.coords[:, 0], grid.coords[:, 1], size0)
    assert frac.min() >= 0.2 and frac.mean() > 0.8
    covered = np.zeros_like(truth)
    for x, y in grid.coords // MASK_DOWNSAMPLE:
        covered[y:y + size0 // MASK_DOWNSAMPLE, x:x + size0 // MASK_DOWNSAMPLE] = True
    assert (covered & truth).sum() / truth.sum() >= 0.9
    assert (grid.coords % size0 == 0).all(), "grid is aligned to level 0"
    order = grid.coords[:, 1] * 10**6 + grid.coords[:, 0]
    assert (np.diff(order) > 0).all(), "row-major order"


def test_patch_size_follows_physical_resolution(tmp_path):
    img, _, _ = render_slide(np.random.default_rng(3), (1024, 1024))
    slide = open_slide(write_pyramidal_tiff(tmp_path / "s.tif", img, mpp=0.25, downsamples=(1, 2, 4)))
    tissue = segment_tissue(slide)
    for params, size0, level in [(PatchConfig(target_mpp=0.5, patch_size=256), 512, 1),
                                 (PatchConfig(magnification=10, patch_size=224, overlap=32), 896, 2),
                                 (PatchConfig(target_mpp=0.3, patch_size=100), 120, 0)]:
        g = make_grid(slide, tissue, params)
        assert g.attrs["patch_size_level0"] == size0 and g.attrs["patch_level"] == level
        stride = size0 - round(params.overlap * size0 / params.patch_size)
        assert (g.coords % stride == 0).all()
    # an Aperio GT450's 0.2527 µm/px: 256 px at 0.5 µm/px span 506.5 level-0 px, rounded to 507 (a floor would
    # give 506, patches 0.2% smaller, at a resolution off by the same); no level is within 1% of 1.98x
    odd = open_slide(write_pyramidal_tiff(tmp_path / "gt450.tif", img, mpp=0.2527, downsamples=(1, 2, 4)))
    g = make_grid(odd, segment_tissue(odd), PatchConfig(target_mpp=0.5, patch_size=256))
    assert g.attrs["patch_size_level0"] == 507 and g.attrs["patch_level"] == 0
