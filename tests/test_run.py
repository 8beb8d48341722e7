"""The user's path end to end: train -> run folder -> evaluate -> predict, resume, and their errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from slidemil.cli import app
from slidemil.config import TrainConfig
from slidemil.errors import InputError, TrainingError
from slidemil.evaluate.metrics import bootstrap_ci
from slidemil.features.store import write_features
from slidemil.predict import predict
from slidemil.train.cv import run_cv

runner = CliRunner()


def _cfg(root, out, **kw):
    base = dict(features=str(root / "features"), labels=str(root / "labels.csv"), out=str(out), folds=3,
                epochs=15, patience=15, lr=1e-3, bootstrap=100, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(feature_cohort, tmp_path_factory):
    root, _ = feature_cohort
    out = tmp_path_factory.mktemp("runs") / "exp1"
    run_cv(_cfg(root, out))
    return root, out


def test_run_folder_is_complete(trained):
    _, run = trained
    for name in ("config.yaml", "splits.csv", "predictions.csv", "metrics.json", "report.html"):
        assert (run / name).is_file(), name
    for k in range(3):
        for name in ("model.safetensors", "model.json", "history.csv", "predictions.csv", "done.json"):
            assert (run / f"fold_{k}" / name).is_file()
        hist = pd.read_csv(run / f"fold_{k}" / "history.csv")
        assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_metric", "lr", "seconds"]
    for plot in ("roc", "pr", "confusion", "calibration"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 1000
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["slidemil"]["torch"] and len(cfg["slidemil"]["features_sha256"]) == 64
    preds = pd.read_csv(run / "predictions.csv")
    assert preds["slide_id"].is_unique and {"prob_negative", "prob_positive", "pred", "fold"} <= set(preds.columns)
    np.testing.assert_allclose(preds[["prob_negative", "prob_positive"]].sum(axis=1), 1, atol=1e-5)
    attn = list((run / "attention").glob("*.h5"))
    assert len(attn) == len(preds)


def test_metrics_have_patient_bootstrap_cis_and_learn(trained):
    _, run = trained
    m = json.loads((run / "metrics.json").read_text())
    auc = m["pooled"]["auroc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert auc["value"] >= 0.9
    assert m["bootstrap"]["unit"] == "patient" and set(m["folds"]) == {"0", "1", "2"}
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "auroc" in html and "<script" not in html


def test_splits_are_used_as_saved(trained):
    _, run = trained
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    preds = pd.read_csv(run / "predictions.csv", dtype=str)
    test_fold = splits[splits["role"] == "test"].set_index("slide_id")["fold"]
    assert (preds.set_index("slide_id")["fold"] == test_fold.loc[preds["slide_id"]]).all()


def test_resume_skips_finished_folds_and_reproduces(trained, tmp_path):
    root, run = trained
    copy = tmp_path / "exp1"
    shutil.copytree(run, copy)
    (copy / "fold_1" / "done.json").unlink()      # as if killed during fold 1
    (copy / "fold_1" / "predictions.csv").unlink()
    before = {k: (copy / f"fold_{k}" / "model.safetensors").stat().st_mtime_ns for k in (0, 2)}
    cfg = _cfg(root, copy)
    with pytest.raises(InputError, match="--resume"):
        run_cv(cfg)
    run_cv(cfg, resume=True)
    after = {k: (copy / f"fold_{k}" / "model.safetensors").stat().st_mtime_ns for k in (0, 2)}
    assert before == after, "finished folds were retrained"
    a = pd.read_csv(run / "predictions.csv")
    b = pd.read_csv(copy / "predictions.csv")
    pd.testing.assert_frame_equal(a, b, atol=1e-5, rtol=0)


def test_resume_with_other_settings_is_refused(trained, tmp_path):
    root, run = trained
    copy = tmp_path / "exp1"
    shutil.copytree(run, copy)
    with pytest.raises(InputError, match=r"different configuration \(lr\)"):
        run_cv(_cfg(root, copy, lr=1e-2), resume=True)


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


def test_nan_loss_stops_and_names_the_epoch(feature_cohort, tmp_path, monkeypatch):
    root, _ = feature_cohort
    from slidemil.models.abmil import ABMIL

    real = ABMIL.loss
    monkeypatch.setattr(ABMIL, "loss", lambda self, out, t, tl: real(self, out, t, tl) * float("nan"))
    with pytest.raises(TrainingError, match=r"at epoch 1 \(bag"):
        run_cv(_cfg(root, tmp_path / "nan"))


def test_patient_bag_unit(feature_cohort, tmp_path):
    root, table = feature_cohort
    run = run_cv(_cfg(root, tmp_path / "pat", bag_unit="patient", epochs=3))
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == table["case_id"].nunique() and (preds["slide_id"] == preds["case_id"]).all()


def test_bootstrap_resamples_patients():
    """Ten copies of each of four patients carry only four patients' worth of evidence: the CI must
    be as wide as for the four patients alone, not narrowed by the copies."""
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8]])
    groups = np.arange(4)
    small = bootstrap_ci(y, probs, groups, n_boot=200, seed=0)["accuracy"]
    big = bootstrap_ci(np.repeat(y, 10), np.repeat(probs, 10, 0), np.repeat(groups, 10), n_boot=200, seed=0)["accuracy"]
    assert big["ci_high"] - big["ci_low"] >= 0.8 * (small["ci_high"] - small["ci_low"])
    naive = bootstrap_ci(np.repeat(y, 10), np.repeat(probs, 10, 0), np.arange(40), n_boot=200, seed=0)["accuracy"]
    assert naive["ci_high"] - naive["ci_low"] < big["ci_high"] - big["ci_low"]


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_models_lists_registry():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("abmil", "clam_sb", "clam_mb", "transmil", "dsmil", "mean_pool", "max_pool", "instance_max"):
        assert name in res.stdout
    assert "Ilse" in res.stdout


def test_cli_train_config_file_and_flag_override(feature_cohort, tmp_path):
    root, _ = feature_cohort
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"features": str(root / "features"), "labels": str(root / "labels.csv"),
                                   "model": "mean_pool", "folds": 2, "epochs": 50, "bootstrap": 50}))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--epochs", "2", "--out", str(out), "--quiet",
                              "--model-arg", "hidden_dim=64"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["model"] == "mean_pool" and saved["model_args"] == {"hidden_dim": 64}
    assert "AUROC" in res.stdout and "report.html" in res.stdout
    assert len(pd.read_csv(out / "fold_0" / "history.csv")) <= 2
    # evaluate recomputes from the run folder alone
    (out / "metrics.json").unlink()
    res = runner.invoke(app, ["evaluate", str(out), "--bootstrap", "50"])
    assert res.exit_code == 0 and (out / "metrics.json").exists()
    # predict writes one row per slide
    res = runner.invoke(app, ["predict", str(out), "--features", str(root / "features"), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(list((root / "features").glob("*.h5")))


def test_cli_reports_bad_input_without_traceback(tmp_path):
    (tmp_path / "labels.csv").write_text("slide,label\na,0\n")
    (tmp_path / "f").mkdir()
    res = runner.invoke(app, ["train", "--features", str(tmp_path / "f"), "--labels", str(tmp_path / "labels.csv"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "column 'slide_id' is missing" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--features", "f", "--labels", "l", "--out", "o", "--folds", "1"])
    assert res.exit_code == 1 and "folds" in res.output
