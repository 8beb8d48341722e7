"""Cross-validation runs: a complete run folder, patient-bootstrap CIs, saved splits, resume, failures named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_config
from slidemil.errors import InputError, TrainingError
from slidemil.train.cv import run_cv

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_run_folder_is_complete(trained):
    _, run = trained
    for name in ("config.yaml", "splits.csv", "predictions.csv", "baseline_predictions.csv", "metrics.json",
                 "report.html"):
        assert (run / name).is_file(), name
    for k in range(3):
        for name in ("model.safetensors", "model.json", "history.csv", "predictions.csv", "done.json"):
            assert (run / f"fold_{k}" / name).is_file()
        hist = pd.read_csv(run / f"fold_{k}" / "history.csv")
        assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_metric", "lr", "val_smoothed", "seconds"]
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
    cfg = run_config(root, copy)
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
    with pytest.raises(InputError, match=r"different configuration \(lr: the run has 0.001, this call 0.01\)"):
        run_cv(run_config(root, copy, lr=1e-2), resume=True)


def test_resume_of_a_run_older_than_a_per_model_default_is_refused(tmp_path):
    """A run saved before `instance_dropout` existed trained dsmil without it; resuming at today's dsmil default
    (0.6) would change the remaining folds, so it is refused, and --instance-dropout 0 resumes it."""
    from slidemil.rundir import RunDir
    from slidemil.train.config import TrainConfig
    from slidemil.train.cv import _check_run_dir

    cfg = TrainConfig(features="f", labels="l", out=str(tmp_path / "run"), model="dsmil")
    saved = cfg.model_dump()
    saved.pop("instance_dropout")
    RunDir(cfg.out).path.mkdir(parents=True)
    RunDir(cfg.out).write_config(saved)
    with pytest.raises(InputError, match=r"different configuration \(instance_dropout: the run has 0.0, this call 0.6\)"):
        _check_run_dir(cfg, resume=True)
    _check_run_dir(TrainConfig(features="f", labels="l", out=cfg.out, model="dsmil", instance_dropout=0), resume=True)


def test_resume_after_a_model_default_changed_is_refused_and_the_flag_named(tmp_path, monkeypatch):
    """config.yaml records every model argument the run was built with; a later release whose default differs
    (instance_max's mean warm-up came in 2026-12-03) must not finish the run's folds another way."""
    from slidemil.models.pooling import InstanceMax
    from slidemil.rundir import RunDir
    from slidemil.train.config import TrainConfig
    from slidemil.train.cv import _check_run_dir

    cfg = TrainConfig(features="f", labels="l", out=str(tmp_path / "run"), model="instance_max")
    assert cfg.resolved_arguments()["model_args"] == {"hidden_dim": 512, "dropout": 0.25, "mean_warmup_epochs": 5}
    saved = cfg.model_dump() | {"slidemil": {"arguments": cfg.resolved_arguments()}}
    RunDir(cfg.out).path.mkdir(parents=True)
    RunDir(cfg.out).write_config(saved)
    _check_run_dir(cfg, resume=True)                                      # nothing changed: resumes
    monkeypatch.setattr(InstanceMax.__init__, "__defaults__", (512, 0.25, 0))   # a release with another default
    with pytest.raises(InputError, match=r"with model_args.mean_warmup_epochs=5, .*; pass --model-arg mean_warmup_epochs=5 "):
        _check_run_dir(cfg, resume=True)
    again = TrainConfig(features="f", labels="l", out=cfg.out, model="instance_max", model_args={"mean_warmup_epochs": 5})
    _check_run_dir(again, resume=True)
    other = TrainConfig(features="f", labels="l", out=cfg.out, model="instance_max", model_args={"mean_warmup_epochs": 3})
    with pytest.raises(InputError, match=r"with model_args.mean_warmup_epochs=5"):    # a flag given differently
        _check_run_dir(other, resume=True)


def test_resume_of_a_class_weighted_run_from_before_the_per_bag_weighting_is_refused(tmp_path):
    """Before the fix, --class-weights balanced cancelled out at one bag a step: folds trained then were
    unweighted, and the remaining folds must not be finished weighted."""
    from slidemil.rundir import RunDir
    from slidemil.train.config import TrainConfig
    from slidemil.train.cv import CLASS_WEIGHTING, _check_run_dir

    cfg = TrainConfig(features="f", labels="l", out=str(tmp_path / "run"), class_weights="balanced")
    old = cfg.model_dump() | {"slidemil": {"arguments": cfg.resolved_arguments()}}
    RunDir(cfg.out).path.mkdir(parents=True)
    RunDir(cfg.out).write_config(old)
    with pytest.raises(InputError, match="no effect at one bag a step"):
        _check_run_dir(cfg, resume=True)
    RunDir(cfg.out).write_config(old | {"slidemil": old["slidemil"] | {"class_weighting": CLASS_WEIGHTING}})
    _check_run_dir(cfg, resume=True)                     # a run started with the per-bag weighting resumes


def test_nan_loss_stops_and_names_the_epoch(feature_cohort, tmp_path, monkeypatch):
    root, _ = feature_cohort
    from slidemil.models.abmil import ABMIL

    real = ABMIL.loss
    monkeypatch.setattr(ABMIL, "loss", lambda self, out, t, tl: real(self, out, t, tl) * float("nan"))
    with pytest.raises(TrainingError, match=r"at epoch 1 \(bag"):
        run_cv(run_config(root, tmp_path / "nan"))


def test_patient_bag_unit(feature_cohort, tmp_path):
    root, table = feature_cohort
    run = run_cv(run_config(root, tmp_path / "pat", bag_unit="patient", epochs=3))
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == table["case_id"].nunique() and (preds["slide_id"] == preds["case_id"]).all()


def test_a_non_finite_loss_names_the_bags_of_its_step():
    """On a GPU the step losses are read once per epoch (no host sync per step); the first non-finite one
    still stops training with the bags of its step named."""
    import torch

    from slidemil.train.trainer import _epoch_loss

    losses = [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    ids = [["a"], ["b", "c"], ["d"], ["e"]]
    assert _epoch_loss(losses[:2], ids[:2], 0) == pytest.approx((1.0 + 2 * 3.0) / 3)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 4 \(bag\(s\) d\)"):
        _epoch_loss(losses, ids, 3)
