"""Slides to features on synthetic whole-slide images with known tissue and tumour masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from slidemil.config import PreprocessConfig
from slidemil.errors import InputError
from slidemil.slides.patching import PatchParams, make_grid, read_coords, tissue_fraction
from slidemil.slides.pipeline import Pipeline, slides_in
from slidemil.slides.reader import SlideReadError, open_slide, read_at, require_mpp
from slidemil.slides.synthetic import MASK_DOWNSAMPLE, make_slide_cohort, render_slide, write_pyramidal_tiff
from slidemil.slides.tissue import TissueParams, geojson_to_mask, mask_to_geojson, segment_tissue

SIZE = (1536, 2048)


@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    make_slide_cohort(root, n_patients=4, slides_per_patient=(1, 1), size=SIZE, seed=5)
    return root


@pytest.fixture(scope="module")
def processed(slide_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    cfg = PreprocessConfig(slides=str(slide_cohort / "slides"), out=str(out), quiet=True, patch_size=128)
    status = Pipeline(cfg.options()).run(slides_in(cfg.slides))
    assert (status["status"] == "done").all(), status
    return slide_cohort, out


def _truth(root, sid, kind):
    return np.asarray(Image.open(root / "slides" / f"{sid}_{kind}.png")) > 0


# --- reading -------------------------------------------------------------------------------------

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


# --- segmentation and patching -------------------------------------------------------------------

def test_segmentation_recovers_tissue_mask(slide_cohort):
    for sid in ("P000_S0", "P001_S0", "P002_S0"):
        tissue = segment_tissue(open_slide(slide_cohort / "slides" / f"{sid}.tif"))
        truth = _truth(slide_cohort, sid, "tissue")
        assert tissue.downsample == MASK_DOWNSAMPLE and tissue.mask.shape == truth.shape
        iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
        assert iou >= 0.9, f"{sid}: IoU {iou:.3f}"


def test_pen_marks_are_not_tissue(tmp_path):
    img, tissue_true, _ = render_slide(np.random.default_rng(2), SIZE)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    draw.line([(50, 100), (1900, 120)], fill=(30, 60, 200), width=140)   # blue pen across the background
    draw.ellipse([1750, 1250, 1980, 1480], fill=(20, 140, 60))          # green dot
    path = write_pyramidal_tiff(tmp_path / "pen.tif", np.asarray(pil), 0.5)
    tissue = segment_tissue(open_slide(path))
    ink = np.zeros_like(tissue_true)
    ink[30 // 16:190 // 16, 4:118] = True
    ink &= ~tissue_true
    assert not (tissue.mask & ink).any()
    off = segment_tissue(open_slide(path), TissueParams(filter_pen=False))
    assert (off.mask & ink).sum() > 20, "the test's ink should look like tissue without the filter"


def test_geojson_roundtrip_in_level0_pixels(slide_cohort):
    tissue = segment_tissue(open_slide(slide_cohort / "slides" / "P000_S0.tif"))
    geo = mask_to_geojson(tissue)
    json.dumps(geo)
    assert geo["type"] == "FeatureCollection" and geo["features"]
    for feat in geo["features"]:
        assert feat["geometry"]["type"] == "Polygon" and feat["properties"]["objectType"] == "annotation"
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert ring.min() >= 0 and ring[:, 0].max() <= SIZE[1] and ring[:, 1].max() <= SIZE[0]
        assert (ring[0] == ring[-1]).all()
    back = geojson_to_mask(geo, tissue.mask.shape, tissue.downsample)
    assert (back & tissue.mask).sum() / (back | tissue.mask).sum() > 0.97


def test_patches_lie_in_tissue_and_cover_it(slide_cohort):
    sid = "P002_S0"
    slide = open_slide(slide_cohort / "slides" / f"{sid}.tif")
    tissue = segment_tissue(slide)
    grid = make_grid(slide, tissue, PatchParams(target_mpp=0.5, patch_size=128, min_tissue=0.25))
    truth = _truth(slide_cohort, sid, "tissue")
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
    for params, size0, level in [(PatchParams(target_mpp=0.5, patch_size=256), 512, 1),
                                 (PatchParams(magnification=10, patch_size=224, overlap=32), 896, 2),
                                 (PatchParams(target_mpp=0.3, patch_size=100), 120, 0)]:
        g = make_grid(slide, tissue, params)
        assert g.attrs["patch_size_level0"] == size0 and g.attrs["patch_level"] == level
        stride = size0 - round(params.overlap * size0 / params.patch_size)
        assert (g.coords % stride == 0).all()


# --- the pipeline --------------------------------------------------------------------------------

def test_coords_and_features_carry_clam_and_trident_attributes(processed):
    _, out = processed
    coords, attrs = read_coords(out / "patches" / "P000_S0.h5")
    for key in ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "target_magnification",
                "level0_magnification", "overlap", "patch_level", "downsample", "level0_width", "level0_height",
                "name", "level_dim", "downsampled_level_dim"):
        assert key in attrs, key
    assert coords.dtype == np.int64 and attrs["target_magnification"] == 20.0
    with h5py.File(out / "features_handcrafted" / "P000_S0.h5") as fh:
        assert fh["features"].shape == (len(coords), 32) and fh["features"].dtype == np.float32
        np.testing.assert_array_equal(fh["coords"][()], coords)
        for key in ("encoder", "encoder_weights", "encoder_sha256", "embedding_dim", "patch_size_level0",
                    "target_mpp", "slide_path", "slidemil_version"):
            assert key in fh.attrs, key
        assert fh["coords"].attrs["patch_size_level0"] == attrs["patch_size_level0"]
    assert (out / "segmentation" / "P000_S0_qc.png").stat().st_size > 1000


def test_handcrafted_features_separate_tumour_from_normal(processed):
    root, out = processed
    xs, ys = [], []
    for f in sorted((out / "features_handcrafted").glob("*.h5")):
        with h5py.File(f) as fh:
            x, c, size0 = fh["features"][()], fh["coords"][()], fh.attrs["patch_size_level0"]
        tum = _truth(root, f.stem, "tumour")
        xs.append(x)
        ys.append(tissue_fraction(tum, MASK_DOWNSAMPLE, c[:, 0], c[:, 1], size0) > 0.5)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert y.sum() >= 5
    best = max(max(roc_auc_score(y, x[:, j]), 1 - roc_auc_score(y, x[:, j])) for j in range(x.shape[1]))
    assert best >= 0.95


def test_bad_slides_are_recorded_and_the_rest_finish(slide_cohort, tmp_path):
    folder = tmp_path / "slides"
    shutil.copytree(slide_cohort / "slides", folder)
    (folder / "corrupt.svs").write_bytes((folder / "P000_S0.tif").read_bytes()[:5000])   # truncated
    img, _, _ = render_slide(np.random.default_rng(4), (512, 512))
    write_pyramidal_tiff(folder / "nompp.tif", img, mpp=None, downsamples=(1,))
    write_pyramidal_tiff(folder / "blank.tif", np.full((1024, 1024, 3), 243, np.uint8), mpp=0.5, downsamples=(1, 4))
    cfg = PreprocessConfig(slides=str(folder), out=str(tmp_path / "out"), quiet=True)
    status = Pipeline(cfg.options()).run(slides_in(folder)).set_index("slide_id")
    failures = pd.read_csv(tmp_path / "out" / "failures.csv").set_index("slide_id")
    assert set(failures.index) == {"corrupt", "nompp", "blank"}
    assert failures.loc["corrupt", "stage"] == "open" and "corrupt.svs: cannot be read" in failures.loc["corrupt", "error"]
    assert "no physical resolution" in failures.loc["nompp", "error"] and "--mpp" in failures.loc["nompp", "error"]
    assert failures.loc["blank", "stage"] == "segment" and "no tissue found" in failures.loc["blank", "error"]
    good = [s for s in status.index if s.startswith("P")]
    assert (status.loc[good, "status"] == "done").all()
    assert all((tmp_path / "out" / "features_handcrafted" / f"{s}.h5").exists() for s in good)
    # an mpp CSV rescues the slide without metadata; failures.csv forgets it
    pd.DataFrame({"slide_id": ["nompp"], "mpp": [0.5]}).to_csv(tmp_path / "mpp.csv", index=False)
    img2 = render_slide(np.random.default_rng(4), (1024, 1024))[0]
    write_pyramidal_tiff(folder / "nompp.tif", img2, mpp=None, downsamples=(1,))
    cfg2 = PreprocessConfig(slides=str(folder), out=str(tmp_path / "out"), quiet=True, mpp_csv=str(tmp_path / "mpp.csv"))
    status2 = Pipeline(cfg2.options()).run(slides_in(folder)).set_index("slide_id")
    assert status2.loc["nompp", "status"] == "done" and status2.loc["P000_S0", "status"] == "skipped"
    assert "nompp" not in set(pd.read_csv(tmp_path / "out" / "failures.csv")["slide_id"])


def test_resume_redoes_partial_extraction_identically(processed, tmp_path):
    root, out = processed
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    feats = copy / "features_handcrafted"
    reference = {p.name: h5py.File(p)["features"][()] for p in feats.glob("*.h5")}
    (feats / "P001_S0.h5").unlink()                                   # killed before the rename
    (feats / ".P001_S0.h5.tmp-999").write_bytes(b"half")
    with h5py.File(feats / "P002_S0.h5", "w") as fh:                  # wrong content under a final name
        fh.create_dataset("features", data=np.zeros((3, 32), np.float32))
        fh.attrs["encoder"] = "handcrafted"
    cfg = PreprocessConfig(slides=str(root / "slides"), out=str(copy), quiet=True, patch_size=128)
    status = Pipeline(cfg.options()).run(slides_in(cfg.slides)).set_index("slide_id")
    assert status.loc["P001_S0", "status"] == "done" and status.loc["P002_S0", "status"] == "done"
    assert status.loc["P000_S0", "status"] == "skipped"
    assert not list(feats.glob(".*tmp*"))
    for name, ref in reference.items():
        np.testing.assert_array_equal(h5py.File(feats / name)["features"][()], ref)


def test_hand_edited_geojson_is_used(processed, tmp_path):
    root, out = processed
    geo = json.loads((out / "segmentation" / "P000_S0.geojson").read_text())
    geo["features"] = geo["features"][:1]
    x0, y0 = np.asarray(geo["features"][0]["geometry"]["coordinates"][0]).min(0)
    geo["features"][0]["geometry"]["coordinates"] = [[[x0, y0], [x0 + 600, y0], [x0 + 600, y0 + 600], [x0, y0 + 600], [x0, y0]]]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "P000_S0.geojson").write_text(json.dumps(geo))
    single = tmp_path / "one"
    single.mkdir()
    shutil.copy(root / "slides" / "P000_S0.tif", single)
    cfg = PreprocessConfig(slides=str(single), out=str(tmp_path / "o"), quiet=True, tissue_geojson=str(tmp_path / "edited"),
                           min_tissue=0.5)
    Pipeline(cfg.options()).run(slides_in(single), stages=("segment", "patch"))
    coords, _ = read_coords(tmp_path / "o" / "patches" / "P000_S0.h5")
    assert len(coords) >= 1
    assert (coords[:, 0] >= x0 - 256).all() and (coords[:, 0] + 256 <= x0 + 600 + 256).all()


def test_extract_at_clam_and_trident_coordinates(slide_cohort, tmp_path):
    """Coordinates written by CLAM (patch_level + patch_size) and TRIDENT (<id>_patches.h5 with
    patch_size_level0) drive extraction directly, with the same footprint as ours."""
    sid = "P001_S0"
    coords = np.array([[256, 256], [512, 512], [768, 256]], np.int64)
    clam, trident = tmp_path / "clam", tmp_path / "trident"
    clam.mkdir()
    trident.mkdir()
    with h5py.File(clam / f"{sid}.h5", "w") as fh:
        ds = fh.create_dataset("coords", data=coords)
        ds.attrs.update({"patch_size": 64, "patch_level": 2, "downsample": [16, 16], "name": sid})
    with h5py.File(trident / f"{sid}_patches.h5", "w") as fh:
        ds = fh.create_dataset("coords", data=coords)
        ds.attrs.update({"patch_size": 256, "patch_size_level0": 1024.0, "target_magnification": 5})
    single = tmp_path / "one"
    single.mkdir()
    shutil.copy(slide_cohort / "slides" / f"{sid}.tif", single)
    feats = {}
    for name, folder in (("clam", clam), ("trident", trident)):
        cfg = PreprocessConfig(slides=str(single), out=str(tmp_path / f"o_{name}"), quiet=True, coords_dir=str(folder))
        status = Pipeline(cfg.options()).run(slides_in(single))
        assert status.loc[0, "status"] == "done", status
        assert not (tmp_path / f"o_{name}" / "patches").exists()
        with h5py.File(tmp_path / f"o_{name}" / "features_handcrafted" / f"{sid}.h5") as fh:
            np.testing.assert_array_equal(fh["coords"][()], coords)
            assert fh.attrs["patch_size_level0"] == 1024
            feats[name] = fh["features"][()]
    np.testing.assert_allclose(feats["clam"], feats["trident"], atol=1e-5)


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
