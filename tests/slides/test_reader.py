"""Slide readers: identical pixels across backends, mpp from metadata or override, corrupt files named."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from slidemil.errors import InputError
from slidemil.slides.reader import SlideReadError, list_slides, open_slide, read_at, require_mpp, slide_files
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


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("size,unit,expected", [(0.5, "µm", 0.5), (250, "nm", 0.25), (0.00025, "mm", 0.25),
                                                (0.5, None, 0.5)])
def test_ome_pixel_size_is_read_in_its_unit(tmp_path, size, unit, expected):
    """OME-XML PhysicalSizeX in its PhysicalSizeXUnit (default µm): 250 nm is 0.25 µm/px, not 250."""
    img = np.full((64, 96, 3), 200, np.uint8)
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit:
        meta |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    tifffile.imwrite(tmp_path / "s.ome.tif", img, photometric="rgb", metadata=meta)
    assert open_slide(tmp_path / "s.ome.tif", backend="tifffile").mpp == pytest.approx(expected)


def test_tiff_resolution_tags_in_inches_and_centimetres(tmp_path):
    """The resolution tags count pixels per inch (ResolutionUnit 2) or per centimetre (3): 0.5 µm/px is
    50,800 px/inch and 20,000 px/cm."""
    for res, unit in ((50800, "INCH"), (20000, "CENTIMETER")):
        tifffile.imwrite(tmp_path / f"{unit}.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb",
                         resolution=(res, res), resolutionunit=unit)
        assert open_slide(tmp_path / f"{unit}.tif").mpp == pytest.approx(0.5), unit


def test_slides_in_subfolders_are_found_as_a_gdc_download_lays_them_out(tmp_path):
    """gdc-client puts each slide in a folder named by its file UUID, beside a logs/ folder and an
    annotations.txt: the slide folder itself held no slide, so preprocess said "holds no slide files"."""
    a = _touch(tmp_path / "0b1c-uuid" / "TCGA-AA-0001-01Z-00-DX1.0b1c.svs")
    _touch(tmp_path / "0b1c-uuid" / "logs" / "0b1c.parcel")
    _touch(tmp_path / "0b1c-uuid" / "annotations.txt")
    b = _touch(tmp_path / "9f2e-uuid" / "TCGA-AA-0002-01Z-00-DX1.9f2e.svs")
    top = _touch(tmp_path / "local.ndpi")
    _touch(tmp_path / "run" / "heatmaps" / "x.png")       # another tool's (or slidemil's) images: not slides
    _touch(tmp_path / ".trash" / "old.svs")              # hidden folders are skipped
    assert list_slides(tmp_path) == [top, a, b]
    # ids stay the file stems, and a table's barcode finds its GDC file in a subfolder
    found = slide_files(tmp_path, ["TCGA-AA-0002-01Z-00-DX1"])
    assert found["TCGA-AA-0002-01Z-00-DX1"] == b and found["local"] == top


def test_masks_and_a_vms_scans_own_jpegs_are_not_slides(tmp_path):
    """CAMELYON ships its annotations as `<id>_mask.tif` (picked up as slides once subfolders are searched), and
    a Hamamatsu .vms keeps its image in JPEGs beside it (`S.jpg` clashed with `S.vms` as a second slide 'S')."""
    slide = _touch(tmp_path / "training" / "tumor_001.tif")
    _touch(tmp_path / "masks" / "tumor_001_mask.tif")
    vms = _touch(tmp_path / "S.vms")
    for name in ("S.jpg", "S(1,0).jpg", "S_map.jpg"):
        _touch(tmp_path / name)
    assert list_slides(tmp_path) == [vms, slide]


def test_one_id_in_two_subfolders_is_refused_naming_both(tmp_path):
    _touch(tmp_path / "batch1" / "S1.svs")
    _touch(tmp_path / "batch2" / "S1.svs")
    with pytest.raises(InputError) as err:
        list_slides(tmp_path)
    assert "batch1/S1.svs and batch2/S1.svs -> 'S1'" in str(err.value)


def test_a_symlinked_folder_loop_is_walked_once(tmp_path):
    a = _touch(tmp_path / "scans" / "A.svs")
    os.symlink(tmp_path, tmp_path / "scans" / "back")   # scans/back -> the slide folder itself
    linked = tmp_path / "more"
    os.symlink(tmp_path / "scans", linked)              # the same slides under a second name: one id, one file
    assert list_slides(tmp_path / "scans") == [a]


def test_a_dicom_slide_is_its_folder_of_level_files(tmp_path):
    """A DICOM slide (as the Imaging Data Commons serves TCGA and others) is a folder of .dcm files, one per
    pyramid level: each file was listed as a slide of its own, the same slide preprocessed once per level
    under ids nobody's table names. Now the folder is one slide, named after the folder."""
    from dicom_slides import write_dicom_slide

    img, _, _ = render_slide(np.random.default_rng(8), (512, 768))
    write_dicom_slide(tmp_path / "idc" / "S1", img, mpp=0.5, container="TCGA-AA-0001-01Z-00-DX1")
    write_dicom_slide(tmp_path / "idc" / "S2", img[::-1].copy(), mpp=0.5)
    found = slide_files(tmp_path / "idc")
    assert sorted(found) == ["S1", "S2"]
    slide = open_slide(found["S1"])
    assert slide.slide_id == "S1" and slide.level_count == 2 and slide.mpp == pytest.approx(0.5)
    assert slide.dimensions == (768, 512) and slide.backend == "openslide"
    region = slide.read_region(0, 0, 0, 768, 512).astype(float)
    assert np.abs(region - img).mean() < 6                                  # the JPEG frames are the slide


def test_two_dicom_slides_in_one_folder_are_refused_naming_it(tmp_path):
    from dicom_slides import write_dicom_slide

    img, _, _ = render_slide(np.random.default_rng(8), (256, 256))
    write_dicom_slide(tmp_path / "flat", img, downsamples=(1,), prefix="a_")
    write_dicom_slide(tmp_path / "flat", img, downsamples=(1,), prefix="b_")
    with pytest.raises(InputError, match=r"flat holds the DICOM files of 2 slides"):
        list_slides(tmp_path)
