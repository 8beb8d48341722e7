"""Heatmaps of a trained run: attention on the tumour, the run's grid and encoder, GeoJSON, failures named."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from slidemil.explain.heatmap import HeatmapOptions, HeatmapRun, NoScoresError
from slidemil.explain.paint import paint
from slidemil.slides.synthetic import MASK_DOWNSAMPLE

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def _tumour_overlap(run_dir, cohort, slide_id) -> float:
    """Share of the top-scoring decile of tissue (heatmap pixels) that lies in the true tumour mask."""
    with h5py.File(run_dir / "heatmaps" / f"{slide_id}_scores.h5") as fh:
        coords, ens, size0 = fh["coords"][()], fh["ensemble"][()], fh.attrs["patch_size_level0"]
    tumour = np.asarray(Image.open(cohort / "slides" / f"{slide_id}_tumour.png")) > 0
    tissue = np.asarray(Image.open(cohort / "slides" / f"{slide_id}_tissue.png")) > 0
    field, covered = paint(coords, ens, size0, MASK_DOWNSAMPLE, tumour.shape)
    on = covered & tissue
    values = field[on]
    top = on & (np.nan_to_num(field, nan=-1) >= np.quantile(values, 0.9))
    return (top & tumour).sum() / top.sum()


def test_heatmap_mass_lies_on_the_tumour(demo_run):
    demo_run = demo_run[0]
    run_dir, cohort = demo_run / "run", demo_run / "cohort"
    ids = [p.name[:-len("_scores.h5")] for p in (run_dir / "heatmaps").glob("*_scores.h5")]
    assert len(ids) >= 2
    overlaps = [_tumour_overlap(run_dir, cohort, s) for s in ids]
    assert np.mean(overlaps) >= 0.7, overlaps


def test_overlap_grid_uses_the_runs_encoder(demo_run, tmp_path):

    out, _ = demo_run
    run_dir, cohort = out / "run", out / "cohort"
    sid = next((run_dir / "heatmaps").glob("*_scores.h5")).name[:-len("_scores.h5")]
    HeatmapRun(run_dir, cohort / "slides", tmp_path, HeatmapOptions(overlap=128)).make(sid)
    with h5py.File(tmp_path / f"{sid}_scores.h5") as fine, h5py.File(run_dir / "heatmaps" / f"{sid}_scores.h5") as base:
        fc, bc = fine["coords"][()], base["coords"][()]
        assert len(fc) > 2.5 * len(bc) and (fc % 128 == 0).all() and not (fc % 256 == 0).all()
        overlap_scores = fine["ensemble"][()]
    tumour = np.asarray(Image.open(cohort / "slides" / f"{sid}_tumour.png")) > 0
    field, covered = paint(fc, overlap_scores, 256, MASK_DOWNSAMPLE, tumour.shape)
    top = covered & (np.nan_to_num(field, nan=-1) >= np.nanquantile(field[covered], 0.9))
    assert (top & tumour).sum() / top.sum() >= 0.6


def test_geojson_patches_are_level0_squares_with_scores(demo_run):
    demo_run = demo_run[0]
    run_dir = demo_run / "run"
    sid = next((run_dir / "heatmaps").glob("*.geojson")).stem
    geo = json.loads((run_dir / "heatmaps" / f"{sid}.geojson").read_text())
    with h5py.File(run_dir / "heatmaps" / f"{sid}_scores.h5") as fh:
        coords, ens, size0 = fh["coords"][()], fh["ensemble"][()], fh.attrs["patch_size_level0"]
    det = [f for f in geo["features"] if f["properties"]["objectType"] == "detection"]
    regions = [f for f in geo["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(det) == len(coords) and regions
    for f, (x, y), s in zip(det, coords, ens):
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == [x, y] and ring[2] == [x + size0, y + size0] and ring[-1] == ring[0]
        assert f["properties"]["measurements"]["score"] == pytest.approx(s)


def test_missing_scores_and_no_tissue_are_reported(demo_run, tmp_path):
    demo_run = demo_run[0]
    import shutil

    run_dir, cohort = demo_run / "run", demo_run / "cohort"
    # a slide of the folder without features: no scores to paint (a folder of its own: the demo's
    # cohort is shared with tests running at the same time)
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(next((cohort / "slides").glob("*.tif")), slides / "unseen.tif")
    hm = HeatmapRun(run_dir, slides, tmp_path / "hm")
    with pytest.raises(NoScoresError, match="unseen: no features .* no scores to paint"):
        hm.make("unseen")
    table = hm.make_all(["unseen"])
    assert table.loc[0, "status"] == "failed" and "no scores" in table.loc[0, "error"]
    # a slide whose scored patches lie where there is no tissue
    from slidemil.slides.synthetic import write_pyramidal_tiff

    sid = next((run_dir / "heatmaps").glob("*_scores.h5")).name[:-len("_scores.h5")]
    blank_dir = tmp_path / "blank"
    blank_dir.mkdir()
    write_pyramidal_tiff(blank_dir / f"{sid}.tif", np.full((2048, 3072, 3), 243, np.uint8), 0.5)
    with pytest.raises(NoScoresError, match="no scored patch lies on tissue"):
        HeatmapRun(run_dir, blank_dir, tmp_path / "hm2").make(sid)


def test_a_run_whose_features_moved_is_painted_from_where_they_are(demo_run, tmp_path):
    """A run trained on a cluster and painted on a laptop (or a project folder moved) failed slide by slide with
    "no features ... extract them first": one line now says to pass --features, which paints alike."""
    import shutil

    from slidemil.errors import InputError

    root, _ = demo_run
    run_dir, cohort = root / "run", root / "cohort"
    with pytest.raises(InputError, match=r"nowhere does not exist; pass --features"):
        HeatmapRun(run_dir, cohort / "slides", tmp_path / "a", features=tmp_path / "nowhere")
    moved = tmp_path / "moved"
    shutil.copytree(cohort / "preprocessed" / "features_handcrafted", moved)
    sid = next((run_dir / "heatmaps").glob("*_scores.h5")).name[:-len("_scores.h5")]
    HeatmapRun(run_dir, cohort / "slides", tmp_path / "b", features=moved).make(sid)
    with h5py.File(tmp_path / "b" / f"{sid}_scores.h5") as new, h5py.File(run_dir / "heatmaps" / f"{sid}_scores.h5") as old:
        np.testing.assert_allclose(new["ensemble"][()], old["ensemble"][()], atol=1e-6)
    # an external cohort (slides and features the run never saw): its slides are painted by default (none were)
    ext_slides, ext_feats = tmp_path / "ext_slides", tmp_path / "ext_feats"
    ext_slides.mkdir()
    ext_feats.mkdir()
    shutil.copy(cohort / "slides" / f"{sid}.tif", ext_slides / "EXT1.tif")
    shutil.copy(moved / f"{sid}.h5", ext_feats / "EXT1.h5")
    hm = HeatmapRun(run_dir, ext_slides, tmp_path / "c", features=ext_feats)
    assert hm.default_ids() == ["EXT1"]
    # painted from the run's own feature folder (no --features), the external slides all failed one by one with
    # "no features ... extract them first": one line for the batch now, naming the encoder and --features
    with pytest.raises(InputError, match=r"none of the 1 slide\(s\) to paint has features in .*--encoder handcrafted"):
        HeatmapRun(run_dir, ext_slides, tmp_path / "x").check()
    assert hm.check() == ["EXT1"]
    # without --out they go apart from heatmaps/, the gallery of the cross-validated slides in the run's report
    assert HeatmapRun(run_dir, ext_slides, features=ext_feats).out == run_dir / "external" / "ext_slides_heatmaps"
    assert HeatmapRun(run_dir, cohort / "slides").out == run_dir / "heatmaps"
    assert (hm.make_all()["status"] == "done").all() and (tmp_path / "c" / "EXT1_heatmap.png").is_file()
    # features of another encoder are named as such, not a shape error from inside the model
    from slidemil.features.store import read_features, write_features

    bag = read_features(ext_feats / "EXT1.h5")
    write_features(ext_feats / "EXT2.h5", bag.features[:, :16], bag.coords, {**bag.attrs, "encoder": "other"})
    shutil.copy(ext_slides / "EXT1.tif", ext_slides / "EXT2.tif")
    table = HeatmapRun(run_dir, ext_slides, tmp_path / "d", features=ext_feats).make_all(["EXT2"])
    assert table.loc[0, "status"] == "failed" and "16-d but the model was trained on 32-d" in table.loc[0, "error"]


def test_a_patient_bag_run_paints_its_slides_by_default(tmp_path):
    """A `--bag-unit patient` run's predictions.csv names patients, so `heatmap` without --slide-ids found
    no slide to paint; its slides now come from splits.csv."""
    import pandas as pd

    from slidemil import models
    from slidemil.models.checkpoint import save_model
    from slidemil.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (tmp_path / "features").mkdir()
    run.write_config({"features": str(tmp_path / "features"), "labels": "l", "out": str(run.path)})
    splits = pd.DataFrame({"slide_id": ["A_1", "A_2", "B_1"], "case_id": ["A", "A", "B"], "fold": 0,
                           "role": ["test", "test", "train"]})
    run.write_splits(splits)
    run.write_predictions(pd.DataFrame({"slide_id": ["A"], "case_id": ["A"], "label": ["x"], "fold": [0],
                                        "prob_x": [0.5], "prob_y": [0.5], "pred": ["x"]}))
    save_model(run.fold_dir(0), models.create("abmil", in_dim=8, n_outputs=2),
               {"model": "abmil", "model_args": {}, "in_dim": 8, "n_outputs": 2, "task": "classification",
                "classes": ["x", "y"], "bag_unit": "patient"})
    run.mark_fold_done(0, {"fold": 0})
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("A_1", "A_2.5e1c2a9f-uuid", "B_1", "other"):      # A_2 as the GDC names a TCGA slide
        (slides / f"{name}.svs").write_bytes(b"")
    hm = HeatmapRun(run.path, slides, tmp_path / "out")
    assert hm.default_ids() == ["A_1", "A_2", "B_1"] and hm.slides["A_2"].name == "A_2.5e1c2a9f-uuid.svs"


def test_a_slide_of_the_run_is_painted_by_the_fold_that_tested_it(demo_run):
    """Heatmaps were the mean of every fold model, most of which had trained on the slide: in-sample scores,
    and a title probability unlike the out-of-fold one the report captions it with. By default (`oof`) a slide
    of the run is painted by its test fold's model, whose prediction is the one in predictions.csv."""
    import pandas as pd

    from slidemil.rundir import RunDir

    root, _ = demo_run
    run_dir, cohort = root / "run", root / "cohort"
    oof = pd.read_csv(run_dir / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    test_fold = RunDir(run_dir).test_folds()
    hm = HeatmapRun(run_dir, cohort / "slides", run_dir / "heatmaps")
    for path in sorted((run_dir / "heatmaps").glob("*_scores.h5")):
        sid = path.name[:-len("_scores.h5")]
        with h5py.File(path) as fh:
            assert list(fh.attrs["folds"]) == [test_fold[sid]]
        prediction = hm.scores(sid)[5]
        assert abs(prediction["prob_tumour"] - oof.loc[sid, "prob_tumour"]) < 1e-4
    every = HeatmapRun(run_dir, cohort / "slides", run_dir / "heatmaps", HeatmapOptions(fold="all"))
    assert len(every.models_for(sid)) == len(set(test_fold.values())) > 1
