"""`slidemil predict` reproduces a run's fold predictions and refuses features of another encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidemil.errors import InputError
from slidemil.features.store import write_features
from slidemil.predict import predict

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_predict_on_training_cohort_reproduces_fold_predictions(trained):
    root, run = trained
    frame = predict(run, root / "features", device="cpu")
    oof = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    frame = frame.set_index("slide_id").loc[oof.index]
    for fold in range(3):
        ids = oof.index[oof["fold"] == fold]
        np.testing.assert_allclose(frame.loc[ids, f"fold{fold}_prob_positive"], oof.loc[ids, "prob_positive"], atol=1e-5)
    fold_cols = [f"fold{k}_prob_positive" for k in range(3)]
    np.testing.assert_allclose(frame["prob_positive"], frame[fold_cols].mean(axis=1), atol=1e-6)


def test_predict_refuses_features_of_another_encoder(trained, tmp_path):
    _, run = trained
    write_features(tmp_path / "x.h5", np.zeros((5, 16)), np.zeros((5, 2)), {"encoder": "synthetic"})
    with pytest.raises(InputError, match=r"16-d but the model was trained on 32-d"):
        predict(run, tmp_path, device="cpu")
    (tmp_path / "x.h5").unlink()
    write_features(tmp_path / "y.h5", np.zeros((5, 32)), np.zeros((5, 2)), {"encoder": "uni_v1"})
    with pytest.raises(InputError, match=r"encoder 'uni_v1' but the model expects 'synthetic'"):
        predict(run, tmp_path, device="cpu")


def test_a_patient_bag_run_predicts_patient_bags_as_its_folds_did(tmp_path):
    """predict scored a `--bag-unit patient` run slide by slide, inputs its folds never saw, and external
    metrics averaged those; now each patient's slides form one bag (grouped by --labels), so predicting the
    training cohort reproduces every fold's out-of-fold risk, and without --labels it is one clear error."""
    from slidemil.data.synthetic import make_feature_cohort
    from slidemil.predict import validate_external
    from slidemil.train.config import TrainConfig
    from slidemil.train.cv import run_cv

    root = tmp_path / "c"
    make_feature_cohort(root, n_patients=12, slides_per_patient=(2, 3), dim=16, bag_size=(10, 30), seed=3)
    run = tmp_path / "run"
    run_cv(TrainConfig(features=str(root / "features"), labels=str(root / "labels.csv"), out=str(run), folds=2,
                       epochs=3, min_epochs=0, bootstrap=20, quiet=True, bag_unit="patient", model="abmil"))
    with pytest.raises(InputError, match=r"patient bags .*pass --labels"):
        predict(run, root / "features", device="cpu")
    frame = predict(run, root / "features", device="cpu", labels=root / "labels.csv")
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    assert sorted(frame["case_id"]) == sorted(labels["case_id"].unique())
    assert all(set(s.split(";")) == set(labels.loc[labels["case_id"] == c, "slide_id"])
               for c, s in zip(frame["case_id"], frame["slide_ids"]))
    oof = pd.read_csv(run / "predictions.csv", dtype={"case_id": str}).set_index("case_id")
    frame = frame.set_index("case_id")
    for fold in range(2):
        ids = oof.index[oof["fold"] == fold]
        np.testing.assert_allclose(frame.loc[ids, f"fold{fold}_prob_positive"], oof.loc[ids, "prob_positive"], atol=1e-5)
    metrics = validate_external(run, frame.reset_index(), root / "labels.csv", n_boot=20)
    assert metrics["n_patients"] == 12 and metrics["external"]["n_scored"] == 12

    # the report's gallery captions each slide's heatmap with its patient's label and prediction (it listed
    # them all, bare ids under "Other slides": the predictions name patients, the heatmaps slides)
    from PIL import Image

    from slidemil.rundir import RunDir
    from slidemil.tasks.evaluation import render_report

    rd = RunDir(run)
    rd.heatmaps_dir.mkdir()
    painted = labels["slide_id"][:4].tolist()
    for sid in painted:
        Image.new("RGB", (8, 8)).save(rd.heatmaps_dir / f"{sid}_heatmap.png")
    page = render_report(rd).read_text()
    for sid in painted:
        assert f"{sid}: label {labels.set_index('slide_id').loc[sid, 'label']}, predicted" in page


def test_predict_meets_barcode_labels_with_gdc_named_feature_files(trained, tmp_path):
    """An external TCGA cohort preprocessed from the GDC's `<barcode>.<UUID>.svs` files has features named
    so, and its label table names barcodes: predict found "none of the predicted slide_ids" in the table.
    The labelled slides now take the table's ids, and every one is scored."""
    import shutil

    from slidemil.predict import validate_external

    root, run = trained
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    ext = tmp_path / "ext"
    ext.mkdir()
    for i, sid in enumerate(labels["slide_id"]):
        shutil.copy(root / "features" / f"{sid}.h5", ext / f"{sid}.{i:08x}-4b1d-uuid.h5")
    frame = predict(run, ext, device="cpu", labels=root / "labels.csv")
    assert sorted(frame["slide_id"]) == sorted(labels["slide_id"])
    oof = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    frame = frame.set_index("slide_id").loc[oof.index]
    ids = oof.index[oof["fold"] == 0]     # the same inputs as the run's own fold 0: the same outputs
    np.testing.assert_allclose(frame.loc[ids, "fold0_prob_positive"], oof.loc[ids, "prob_positive"], atol=1e-5)
    metrics = validate_external(run, frame.reset_index(), root / "labels.csv", n_boot=20)
    assert metrics["external"]["n_scored"] == len(labels)


def test_features_made_unlike_the_runs_are_said_and_reach_the_external_caveats(trained, tmp_path, caplog):
    """An external cohort extracted at other patch sizes (or resolution, encoder weights, stain normalisation)
    than the run's training features was scored without a word: the predictions were of another domain."""
    import shutil

    import h5py

    from slidemil.predict import validate_external

    root, run = trained
    ext = tmp_path / "ext"
    shutil.copytree(root / "features", ext)
    files = sorted(ext.glob("*.h5"))
    for f in files[:3]:
        with h5py.File(f, "r+") as fh:
            for node in (fh, fh["coords"]):
                if "patch_size" in node.attrs:
                    node.attrs["patch_size"] = 512
    with caplog.at_level("WARNING", logger="slidemil.predict"):
        frame = predict(run, ext, device="cpu")
    line = f"3 of {len(files)} feature files (e.g. {files[0].name}) were made with 512 px patches, the run's training"
    assert line in caplog.text
    metrics = validate_external(run, frame, root / "labels.csv", n_boot=20)
    assert any(w.startswith(line) for w in metrics["warnings"])
    assert not predict(run, root / "features", device="cpu").attrs["warnings"]     # the run's own: nothing


def test_skip_missing_names_the_slides_it_leaves_out(trained, caplog):
    """`predict --skip-missing` dropped slides without features from the output without a word."""
    root, run = trained
    first = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str})["slide_id"][0]
    with caplog.at_level("WARNING"):
        frame = predict(run, root / "features", slide_ids=[first, "nosuch"], device="cpu", skip_missing=True)
    assert list(frame["slide_id"]) == [first]
    assert "1 slide(s) left out of the predictions: nosuch (no feature file" in caplog.text


def test_evaluate_and_predict_check_their_numeric_flags_as_train_does(trained, tmp_path):
    """`evaluate --bootstrap -1` ran as if 0 (no CIs) and `predict --max-instances-infer 0` reached the model:
    these verbs use the values without building a TrainConfig, so they went unchecked."""
    from conftest import runner
    from slidemil.cli import app

    root, run = trained
    res = runner.invoke(app, ["evaluate", str(run), "--bootstrap", "-1"])
    assert res.exit_code == 1 and "--bootstrap -1: Input should be greater than or equal to 0" in res.output
    res = runner.invoke(app, ["predict", str(run), "--features", str(root / "features"), "--out",
                              str(tmp_path / "p.csv"), "--max-instances-infer", "0"])
    assert res.exit_code == 1 and "--max-instances-infer 0: Input should be greater than or equal to 1" in res.output
    assert not (tmp_path / "p.csv").exists()
