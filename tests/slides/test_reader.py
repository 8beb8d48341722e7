"""Slide readers: identical pixels across backends, mpp from metadata or override, corrupt files named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from slidemil.slides.reader import SlideReadError, open_slide, read_at, require_mpp
from slidemil.slides.synthetic import render_slide, write_pyramidal_tiff


def test_openslide_and_tifffile_read_identical_pixels(slide_cohort):
    path = slide_cohort / "slides" / "P001_S0.tif"
    a, b = open_slide(path, backend="openslide"), open_slide(path, backend="tifffile")
    assert (a.backend, b.backend) == ("openslide", "tifffile")
    assert a.level_dimensions == b.level_dimensions and a.level_downsamples == b.level_downsamples
    for x, y, level, w, h in [(300, 200, 0, 256, 256), (0, 0, 1, 300, 200), (1900, 1400, 0, 256, 256), (0, 0, 2, 128, 96)]:
        np.testing.assert_array_equal(a.read_region(x, y, level, w, h), b.read_region(x, y, level, w, h))


def test_mpp_from_metadata_and_override(slide_cohort, tmp_path):
    path = slide_cohort / "slides" / "P000_S0.tif"
    assert open_slide(path).backend == "tifffile"  # the faster reader for tiled JPEG pyramids
    assert open_slide(path, backend="openslide").mpp == pytest.approx(0.5)
    assert open_slide(path, backend="tifffile").mpp == pytest.approx(0.5)
    assert open_slide(path, mpp=0.25).mpp == 0.25
    img, _, _ = render_slide(np.random.default_rng(0), (512, 512))
    bare = write_pyramidal_tiff(tmp_path / "nompp.tif", img, mpp=None, downsamples=(1,))
    slide = open_slide(bare)
    assert slide.mpp is None
    with pytest.raises(SlideReadError, match=r"nompp\.tif: the slide's metadata has no physical resolution"):
        require_mpp(slide)


def test_read_at_target_mpp_uses_pyramid_and_resizes(tmp_path):
    img, _, _ = render_slide(np.random.default_rng(1), (1024, 1024))
    path = write_pyramidal_tiff(tmp_path / "s.tif", img, mpp=0.25, downsamples=(1, 4))
    slide = open_slide(path)
    assert slide.best_level_for_downsample(2.0) == 0 and slide.best_level_for_downsample(4.0) == 1
    tile = read_at(slide, 256, 256, 512, 256)  # 0.5 µm/px from a 0.25 µm/px slide
    ref = np.asarray(Image.fromarray(img[256:768, 256:768]).resize((256, 256), Image.BILINEAR, reducing_gap=2.0))
    assert tile.shape == (256, 256, 3)
    assert np.abs(tile.astype(int) - ref.astype(int)).mean() < 6  # JPEG + resampling differences only


def test_corrupt_file_names_itself(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideReadError, match=r"broken\.svs: cannot be read"):
        open_slide(bad)


def test_plain_png_and_flat_tiff_are_readable(tmp_path):
    import tifffile

    img, _, _ = render_slide(np.random.default_rng(6), (512, 768))
    Image.fromarray(img).save(tmp_path / "small.png")
    png = open_slide(tmp_path / "small.png", mpp=0.5)
    assert png.backend == "image" and png.dimensions == (768, 512) and png.mpp == 0.5
    np.testing.assert_array_equal(png.read_region(100, 50, 0, 64, 32), img[50:82, 100:164])
    tifffile.imwrite(tmp_path / "flat.tif", img, photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    flat = open_slide(tmp_path / "flat.tif")
    assert flat.mpp == pytest.approx(0.5) and flat.level_count == 1
    np.testing.assert_array_equal(flat.read_region(10, 20, 0, 40, 30), img[20:50, 10:50])
