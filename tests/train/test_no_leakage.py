"""The reported fold never shapes what is fitted: the input standardisation and the reference baseline are
fitted on each fold's training patients only. Each test plants a test fold that would move the fitted
statistic far if it leaked in."""

from __future__ import annotations

import numpy as np
import pandas as pd
from safetensors.torch import load_file

from slidemil.data.synthetic import make_feature_cohort
from slidemil.features.store import read_features, write_features


def _cohort_with_loud_patients(root):
    """A 12-patient cohort whose patients P000-P003 carry features offset by +1000 (a scanner gone wrong):
    any statistic those patients' bags take part in moves by hundreds."""
    make_feature_cohort(root, n_patients=12, dim=8, bag_size=(10, 20), seed=3)
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    loud = set(labels["case_id"].unique()[:4])
    for sid, case in zip(labels["slide_id"], labels["case_id"]):
        if case in loud:
            bag = read_features(root / "features" / f"{sid}.h5")
            write_features(root / "features" / f"{sid}.h5", bag.features + 1000, bag.coords, dict(bag.attrs))
    return labels, loud


def _train_slides(run, fold) -> list[str]:
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    rows = splits[splits["fold"] == str(fold)]
    return list(rows.loc[rows["role"] == "train", "slide_id"])


def test_the_standardisation_is_fitted_on_the_training_bags_only(tmp_path):
    from conftest import run_config
    from slidemil.train.cv import run_cv

    root, out = tmp_path / "c", tmp_path / "run"
    _cohort_with_loud_patients(root)
    run_cv(run_config(root, out, model="mean_pool", folds=3, epochs=2, patience=2, bootstrap=10, standardize="on"))
    for fold in range(3):
        train = _train_slides(out, fold)
        x = np.concatenate([read_features(root / "features" / f"{s}.h5").features for s in train]).astype(np.float64)
        state = load_file(str(out / f"fold_{fold}" / "model.safetensors"))
        mean = [v for k, v in state.items() if k.endswith("mean")]
        assert len(mean) == 1, sorted(state)
        np.testing.assert_allclose(mean[0].numpy(), x.mean(0), rtol=1e-4, atol=1e-3,
                                   err_msg=f"fold {fold}: the scaling's mean is not the training bags' mean")


def test_the_baseline_is_fitted_without_the_test_fold(tmp_path, monkeypatch):
    """The baseline fits on each fold's training and validation bags (its own inner CV tunes it) and
    predicts the test bags, none of which it saw."""
    from conftest import run_config
    from slidemil.tasks.classification import Classification
    from slidemil.train.cv import run_cv

    seen = []
    real = Classification.baseline_columns

    def spy(self, x_fit, y_fit, groups, x_test, meta, seed):
        seen.append((np.asarray(x_fit).copy(), set(groups), np.asarray(x_test).copy()))
        return real(self, x_fit, y_fit, groups, x_test, meta, seed)

    monkeypatch.setattr(Classification, "baseline_columns", spy)
    root, out = tmp_path / "c", tmp_path / "run"
    _cohort_with_loud_patients(root)
    run_cv(run_config(root, out, model="mean_pool", folds=3, epochs=1, patience=1, bootstrap=10))
    assert len(seen) == 3
    splits = pd.read_csv(out / "splits.csv", dtype=str)
    for fold, (x_fit, groups, x_test) in enumerate(seen):
        rows = splits[splits["fold"] == str(fold)]
        test_cases = set(rows.loc[rows["role"] == "test", "case_id"])
        assert not groups & test_cases, f"fold {fold}: the baseline was fitted on test patients"
        assert len(x_fit) == (rows["role"] != "test").sum() and len(x_test) == (rows["role"] == "test").sum()
        # no fitted row is a test bag's mean
        assert not any(np.allclose(a, b) for a in x_fit for b in x_test)
    base = pd.read_csv(out / "baseline_predictions.csv", dtype={"slide_id": str})
    assert set(base["slide_id"]) == set(splits["slide_id"]) and base["slide_id"].is_unique
    assert np.isfinite(base.filter(like="prob_").to_numpy(float)).all()
