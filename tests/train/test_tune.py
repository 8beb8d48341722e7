"""`--tune`: a per-fold search that rescues a bad configuration, selects on the inner validation split
only (the test fold never reaches a trial), and says what it chose."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import run_config
from slidemil.train import cv as cv_module
from slidemil.train.config import TrainConfig
from slidemil.train.cv import run_cv
from slidemil.train.tune import SPACE

pytestmark = pytest.mark.slow


def test_tuning_rescues_a_learning_rate_too_small_to_learn_and_never_sees_the_test_fold(feature_cohort, tmp_path,
                                                                                      monkeypatch):
    root, _ = feature_cohort
    seen = []
    real_fit = cv_module.fit

    def spy(model, train_ds, val_ds, cfg, *args, **kw):
        seen.append({u[0] for u in train_ds.units} | ({u[0] for u in val_ds.units} if val_ds is not None else set()))
        return real_fit(model, train_ds, val_ds, cfg, *args, **kw)

    monkeypatch.setattr(cv_module, "fit", spy)
    bad = dict(lr=1e-6, epochs=10, patience=10, min_epochs=0, bootstrap=0)     # cannot learn in 10 epochs
    run_cv(run_config(root, tmp_path / "tuned", **bad, tune=True, tune_trials=4))
    tuned = json.loads((tmp_path / "tuned" / "metrics.json").read_text())["pooled"]["auroc"]["value"]
    assert tuned >= 0.85
    splits = pd.read_csv(tmp_path / "tuned" / "splits.csv")
    assert len(seen) == 3 * 4                                   # every trial of every fold went through fit
    for fold in range(3):
        test_ids = set(splits.loc[(splits["fold"] == fold) & (splits["role"] == "test"), "slide_id"])
        trials = seen[fold * 4:(fold + 1) * 4]
        assert all(not (ids & test_ids) for ids in trials)     # no trial ever trained or validated on the test fold
        table = pd.read_csv(tmp_path / "tuned" / f"fold_{fold}" / "tuning.csv")
        assert len(table) == 4 and set(SPACE) <= set(table.columns)
        assert table.loc[0, "lr"] == pytest.approx(1e-6)         # the first trial is the configuration given...
        assert table["validation"].max() > table.loc[0, "validation"]   # ...and a later one beat it
        meta = json.loads((tmp_path / "tuned" / f"fold_{fold}" / "model.json").read_text())
        assert meta["tuned"]["settings"]["lr"] > 1e-6 and meta["tuned"]["trials"] == 4
    assert "Tuning (--tune)" in (tmp_path / "tuned" / "report.html").read_text()


def test_tune_needs_a_validation_split():
    with pytest.raises(ValueError, match="validation split"):
        TrainConfig(features="f", labels="l", out="o", tune=True, val_fraction=0.0)
    with pytest.raises(ValueError, match="validation split"):
        TrainConfig(features="f", labels="l", out="o", tune=True, select="last")
