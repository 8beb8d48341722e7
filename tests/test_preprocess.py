"""Slides to features on synthetic slides: attributes, separable features, failures recorded, resume, coords."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import tissue_truth
from slidemil.preprocess import Pipeline, PreprocessConfig, slides_in
from slidemil.slides.patching import read_coords, tissue_fraction
from slidemil.slides.synthetic import MASK_DOWNSAMPLE, render_slide, write_pyramidal_tiff

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


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
        tum = tissue_truth(root, f.stem, "tumour")
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
    status = Pipeline(cfg).run(slides_in(folder)).set_index("slide_id")
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
    status2 = Pipeline(cfg2).run(slides_in(folder)).set_index("slide_id")
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
    status = Pipeline(cfg).run(slides_in(cfg.slides)).set_index("slide_id")
    assert status.loc["P001_S0", "status"] == "done" and status.loc["P002_S0", "status"] == "done"
    assert status.loc["P000_S0", "status"] == "skipped"
    assert not list(feats.glob(".*tmp*"))
    for name, ref in reference.items():
        np.testing.assert_array_equal(h5py.File(feats / name)["features"][()], ref)


def test_a_rerun_with_other_patch_settings_is_refused_and_weights_are_hashed_once(processed, tmp_path, monkeypatch):
    """A rerun into the same --out at another --patch-size or --target-mpp skipped every finished slide (its
    patches of the old settings kept) and patched only the new ones: one cohort, two grids, without a word.
    It is now refused before anything is written. And the encoder's weights were hashed for every slide."""
    from slidemil import preprocess
    from slidemil.errors import InputError

    root, out = processed
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*.h5")}
    for change, words in (({"patch_size": 256}, "--patch-size 128, this call asks --patch-size 256"),
                          ({"target_mpp": 1.0}, "--target-mpp 0.5, this call asks --target-mpp 1")):
        cfg = PreprocessConfig(slides=str(root / "slides"), out=str(copy), quiet=True, **{"patch_size": 128, **change})
        with pytest.raises(InputError, match=words):
            Pipeline(cfg).run(slides_in(cfg.slides))
    assert {p.name: p.stat().st_mtime_ns for p in copy.rglob("*.h5")} == before        # nothing written
    hashed = []
    monkeypatch.setattr(preprocess, "_weights_sha", lambda path: hashed.append(path) or "none")
    (copy / "features_handcrafted" / "P001_S0.h5").unlink()
    (copy / "features_handcrafted" / "P002_S0.h5").unlink()
    cfg = PreprocessConfig(slides=str(root / "slides"), out=str(copy), quiet=True, patch_size=128)
    status = Pipeline(cfg).run(slides_in(cfg.slides)).set_index("slide_id")
    assert (status.loc[["P001_S0", "P002_S0"], "status"] == "done").all() and len(hashed) == 1


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
    Pipeline(cfg).run(slides_in(single), stages=("segment", "patch"))
    coords, _ = read_coords(tmp_path / "o" / "patches" / "P000_S0.h5")
    assert len(coords) >= 1
    assert (coords[:, 0] >= x0 - 256).all() and (coords[:, 0] + 256 <= x0 + 600 + 256).all()


def test_a_rerun_with_edited_contours_or_tissue_settings_redoes_what_follows(processed, tmp_path):
    """The QuPath loop: preprocess, fix a slide's contours by hand, rerun with --tissue-geojson into the same
    --out. The finished slide was "skipped", its edit ignored without a word; so were new tissue settings.
    Each output now records what it was made from, and a rerun made otherwise redoes it and what follows."""
    root, out = processed
    single, copy = tmp_path / "one", tmp_path / "out"
    single.mkdir()
    shutil.copy(root / "slides" / "P000_S0.tif", single)
    shutil.copytree(out, copy)
    base = dict(slides=str(single), out=str(copy), quiet=True, patch_size=128)
    run = lambda **kw: Pipeline(PreprocessConfig(**base, **kw)).run(slides_in(single)).loc[0, "status"]  # noqa: E731
    assert run() == "skipped"
    geo = json.loads((copy / "segmentation" / "P000_S0.geojson").read_text())
    x0, y0 = np.asarray(geo["features"][0]["geometry"]["coordinates"][0]).min(0)
    square = lambda side: [[[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]]  # noqa: E731
    geo["features"] = [dict(geo["features"][0], geometry={"type": "Polygon", "coordinates": square(500)})]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "P000_S0.geojson").write_text(json.dumps(geo))
    assert run(tissue_geojson=str(tmp_path / "edited")) == "done"
    coords, _ = read_coords(copy / "patches" / "P000_S0.h5")
    with h5py.File(copy / "features_handcrafted" / "P000_S0.h5") as fh:
        np.testing.assert_array_equal(fh["coords"][()], coords)          # the features followed the patches
    assert (coords[:, 0] >= x0 - 128).all() and (coords[:, 0] <= x0 + 500).all()
    assert run(tissue_geojson=str(tmp_path / "edited")) == "skipped"
    geo["features"][0]["geometry"]["coordinates"] = square(900)          # edited again, exported by a QuPath
    (tmp_path / "edited" / "P000_S0.geojson").unlink()                  # script as an array of features, .json
    (tmp_path / "edited" / "P000_S0.json").write_text(json.dumps(geo["features"]))
    assert run(tissue_geojson=str(tmp_path / "edited")) == "done"
    assert len(read_coords(copy / "patches" / "P000_S0.h5")[0]) > len(coords)
    assert run(median=9) == "done" and run(median=9) == "skipped"      # other tissue settings
    assert run(median=9, min_tissue=0.9) == "done"                      # another tissue share per patch


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
        status = Pipeline(cfg).run(slides_in(single))
        assert status.loc[0, "status"] == "done", status
        assert not (tmp_path / f"o_{name}" / "patches").exists()
        with h5py.File(tmp_path / f"o_{name}" / "features_handcrafted" / f"{sid}.h5") as fh:
            np.testing.assert_array_equal(fh["coords"][()], coords)
            assert fh.attrs["patch_size_level0"] == 1024
            feats[name] = fh["features"][()]
    np.testing.assert_allclose(feats["clam"], feats["trident"], atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_feature_row_is_the_tile_at_its_own_coordinates(slide_cohort, tmp_path, workers):
    """Extraction in batches smaller than the slide's patch count (and from worker processes) writes row k from
    the tile at coords[k]: every row equals the encoder applied to that one tile read alone."""
    import torch

    from slidemil.features.encoders import create_encoder
    from slidemil.slides.reader import open_slide
    from slidemil.slides.tiles import PatchDataset

    sid = "P001_S0"
    coords = np.array([[x, y] for y in (0, 512, 1024) for x in (0, 384, 768, 1152)], np.int64)   # 12 tiles
    folder, single = tmp_path / "coords", tmp_path / "one"
    folder.mkdir()
    single.mkdir()
    with h5py.File(folder / f"{sid}_patches.h5", "w") as fh:
        fh.create_dataset("coords", data=coords).attrs.update(
            {"patch_size": 256, "patch_size_level0": 384.0, "target_magnification": 10})
    shutil.copy(slide_cohort / "slides" / f"{sid}.tif", single)
    cfg = PreprocessConfig(slides=str(single), out=str(tmp_path / "out"), quiet=True, coords_dir=str(folder),
                           batch_size=5, num_workers=workers)
    assert Pipeline(cfg).run(slides_in(single)).loc[0, "status"] == "done"
    with h5py.File(tmp_path / "out" / "features_handcrafted" / f"{sid}.h5") as fh:
        np.testing.assert_array_equal(fh["coords"][()], coords)
        feats = fh["features"][()]
    encoder = create_encoder("handcrafted").eval()
    with open_slide(single / f"{sid}.tif") as slide:
        mpp = slide.mpp
    tiles = PatchDataset(single / f"{sid}.tif", coords, 384, encoder.spec.input_size, mpp=mpp)
    with torch.no_grad():
        alone = np.concatenate([encoder(tiles[i][None].float() / 255).numpy() for i in range(len(coords))])
    assert len(np.unique(alone.round(3), axis=0)) >= 6                 # tiles that differ, so an order shows
    np.testing.assert_allclose(feats, alone, atol=1e-4)


def test_a_slide_scanned_coarser_than_the_target_is_warned_about(tmp_path, caplog):
    """A 20x scan (0.5 µm/px) in a cohort patched at 40x (0.25) had its patches upsampled 2x without a word,
    so the encoder saw interpolated pixels unlike the other slides'. The log now names the slide, the factor
    and the --target-mpp that avoids it; a slide at the target (within 10%) is not warned about."""
    folder = tmp_path / "slides"
    folder.mkdir()
    img, _, _ = render_slide(np.random.default_rng(5), (1024, 1024))
    write_pyramidal_tiff(folder / "coarse.tif", img, mpp=0.5, downsamples=(1,))
    write_pyramidal_tiff(folder / "fine.tif", img, mpp=0.2527, downsamples=(1,))
    cfg = PreprocessConfig(slides=str(folder), out=str(tmp_path / "out"), quiet=True, target_mpp=0.25)
    with caplog.at_level("WARNING"):
        status = Pipeline(cfg).run(slides_in(folder), stages=("segment", "patch")).set_index("slide_id")
    assert (status["status"] == "done").all()
    assert "coarse: scanned at 0.5 µm/px, coarser than the target 0.25 µm/px" in caplog.text
    assert "upsampled 2.0x" in caplog.text and "--target-mpp 0.5" in caplog.text
    assert "fine:" not in caplog.text


def test_torchrun_ranks_share_the_slides_out_without_overlap(tmp_path, monkeypatch):
    """Under torchrun every rank takes every WORLD_SIZE-th slide: together the ranks cover each slide once, each
    about the same number; outside torchrun one process takes them all."""
    for i in range(11):
        (tmp_path / f"S{i:02d}.svs").write_bytes(b"")
    everything = slides_in(tmp_path)
    taken = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        taken.append(slides_in(tmp_path))
    assert sorted(p for part in taken for p in part) == sorted(everything) and len(everything) == 11
    assert sorted(len(part) for part in taken) == [3, 4, 4]
