"""Survival metrics as a reviewer checks them: per-fold IPCW from the fold's training patients (against
scikit-survival given that training data explicitly), Breslow S(t) for Cox (against scikit-survival's
estimator) so the IBS exists for every loss, the IBS range option, and NaN with its reason."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.util import Surv

from slidemil.evaluate.survival import breslow, ibs_window
from slidemil.tasks import create_task

N, FOLDS = 90, 3


def _cohort(seed=0, censor_scale=1.0):
    """One slide per patient; hazard exp(x); censoring that differs by fold so that the test fold's own
    censoring distribution and the training folds' are not the same."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=N)
    fold = np.arange(N) % FOLDS
    event_time = rng.exponential(np.exp(-x))
    censor = rng.exponential(censor_scale * (0.5 + fold), N)          # fold 0 censored early, fold 2 late
    time = np.minimum(event_time, censor) + 1e-3
    event = (event_time <= censor).astype(int)
    cases = [f"p{i}" for i in range(N)]
    preds = pd.DataFrame({"slide_id": cases, "case_id": cases, "fold": fold, "time": time, "event": event,
                          "risk": x + rng.normal(0, 0.5, N)})
    splits = pd.concat([pd.DataFrame({"slide_id": cases, "case_id": cases, "fold": f,
                                      "role": np.where(fold == f, "test", "train")}) for f in range(FOLDS)])
    return preds, splits


def test_per_fold_uno_c_and_td_auc_use_the_training_folds_censoring():
    """Each fold's Uno's C and td-AUC equal scikit-survival's with the fold's *training* patients as the
    censoring data; they differ from the value with the test fold's own censoring (the old behaviour)."""
    preds, splits = _cohort()
    task = create_task({"task": "survival"})
    meta = {"classes": [], "loss": "nll", "eval_times": [0.3, 0.6]}
    metrics = task.evaluate(preds, splits, meta, n_boot=0, seed=0)
    tau = metrics["tau"]
    differs = 0
    for f in range(FOLDS):
        test, train = preds[preds["fold"] == f], preds[preds["fold"] != f]
        # scikit-survival refuses test times past the last training time; slidemil censors them there
        limit = train["time"].max()
        y_test = Surv.from_arrays(test["event"].astype(bool) & (test["time"] <= limit), np.minimum(test["time"], limit))
        y_train = Surv.from_arrays(train["event"].astype(bool), train["time"])
        uno = concordance_index_ipcw(y_train, y_test, test["risk"].to_numpy(), tau=tau)[0]
        assert metrics["folds"][f]["c_index_uno"] == pytest.approx(uno, abs=1e-12)
        times = np.array([t for t in (0.3, 0.6) if test["time"].min() <= t < test["time"].max()
                          and t < train["time"].max()])
        if len(times):
            auc = cumulative_dynamic_auc(y_train, y_test, test["risk"].to_numpy(), times)[1]
            assert metrics["folds"][f]["td_auc"] == pytest.approx(auc, abs=1e-12)
        # the old path: the fold scored with its own rows as the censoring data (NaN or another value)
        own = task.score(test, None, {**meta, "tau": tau})["c_index_uno"]
        differs += not np.isclose(own, uno, atol=1e-4)
    assert differs >= 2


def test_breslow_matches_scikit_survival():
    rng = np.random.default_rng(1)
    r = rng.normal(size=60)
    time = np.round(rng.exponential(np.exp(-r)) * 10) / 10 + 0.1     # ties on purpose
    event = rng.random(60) < 0.7
    grid = np.linspace(0.1, time.max(), 25)
    ours = breslow(time, event, r, grid)
    ref = BreslowEstimator().fit(r, event, time)
    # ours is centred (exp(r - mean r)); the survival curves, which are what is used, must agree
    s_ours = np.exp(-ours[None, :] * np.exp(r - r.mean())[:, None])
    s_ref = np.stack([fn(grid) for fn in ref.get_survival_function(r)])
    assert np.allclose(s_ours, s_ref, atol=1e-10)


def _cox_preds(preds):
    """Prediction columns a Cox fold model would write: Breslow fitted on the training folds."""
    task = create_task({"task": "survival", "survival_loss": "cox"})
    out = []
    for f in range(FOLDS):
        train, test = preds[preds["fold"] != f], preds[preds["fold"] == f]
        state = task.after_fit({"loss": "cox"}, train["risk"].to_numpy()[:, None],
                               train[["time", "event"]].to_numpy(float))
        cols = task.columns(state, test["risk"].to_numpy()[:, None], {})
        out.append(test.drop(columns="risk").assign(**cols))
    return task, pd.concat(out).reset_index(drop=True)


def test_cox_runs_have_survival_curves_and_a_finite_ibs():
    preds, splits = _cohort(2)
    task, cox = _cox_preds(preds)
    assert any(c.startswith("surv_time_") for c in cox.columns)
    s = cox[[c for c in cox.columns if c.startswith("surv_") and "time" not in c]].to_numpy()
    assert ((s >= 0) & (s <= 1)).all() and (np.diff(s, axis=1) <= 1e-12).all()     # a survival curve
    metrics = task.evaluate(cox, splits, {"classes": [], "loss": "cox"}, n_boot=20, seed=0)
    assert np.isfinite(metrics["pooled"]["ibs"]["value"]) and 0 < metrics["pooled"]["ibs"]["value"] < 0.25
    # an informative model beats the same curves with the risks shuffled
    shuffled = cox.copy()
    surv_cols = [c for c in cox.columns if c.startswith("surv_") and "time" not in c]
    shuffled[surv_cols] = cox[surv_cols].sample(frac=1, random_state=0).to_numpy()
    worse = task.evaluate(shuffled, splits, {"classes": [], "loss": "cox"}, n_boot=0, seed=0)
    assert worse["pooled"]["ibs"]["value"] > metrics["pooled"]["ibs"]["value"]


def test_ibs_range_option_sets_the_integration_window():
    preds, _ = _cohort(3)
    time, event = preds["time"], preds["event"]
    assert ibs_window("follow-up", time, event) == (time.min(), time.max())
    q = np.quantile(time[event == 1], [0.25, 0.75])
    assert np.allclose(ibs_window("event-iqr", time, event), q)
    assert np.allclose(ibs_window("0.1,0.9", time, event), np.quantile(time[event == 1], [0.1, 0.9]))
    task, cox = _cox_preds(preds)
    narrow = create_task({"task": "survival", "survival_loss": "cox", "ibs_range": "event-iqr"})
    a = task.evaluate(cox, None, {"classes": [], "loss": "cox"}, 0, 0)
    b = narrow.evaluate(cox, None, {"classes": [], "loss": "cox"}, 0, 0)
    assert a["ibs_window"] == [time.min(), time.max()] and np.allclose(b["ibs_window"], q)
    assert a["pooled"]["ibs"]["value"] != b["pooled"]["ibs"]["value"]
    with pytest.raises(Exception, match="two quantiles"):
        create_task({"task": "survival", "ibs_range": "0.9,0.1"})


def test_a_metric_undefined_on_a_fold_is_nan_with_its_reason():
    """Evaluation times beyond every follow-up: td-AUC is undefined everywhere, and metrics.json and the
    report say why instead of printing n/a alone."""
    preds, splits = _cohort(4)
    task = create_task({"task": "survival", "eval_times": [1e6]})
    metrics = task.evaluate(preds, splits, {"classes": [], "loss": "nll"}, n_boot=0, seed=0)
    assert all(np.isnan(m["td_auc"]) for m in metrics["folds"].values())
    assert "fold 0 td_auc" in metrics["nan_reasons"] and "follow-up" in metrics["nan_reasons"]["fold 0 td_auc"]
    assert "td_auc" in task.report_notes(metrics) and "Why some values are n/a" in task.report_notes(metrics)


def test_the_fold_ensemble_pools_risks_on_each_folds_training_scale():
    """Cox risks are on an arbitrary scale per fold (a shift and spread the partial likelihood ignores): the
    ensemble averages each fold's risk standardised by its own training risks, so a fold whose logits run
    in the hundreds does not outvote one whose logits lie near 0. Patient A is above both folds' training
    medians, patient B below both: A is high risk, B low, whatever the raw scales."""
    task = create_task({"task": "survival", "survival_loss": "cox"})
    meta = [{"fold": 0, "task_state": {"loss": "cox", "train_risk": {"median": 0.0, "std": 1.0}}},
            {"fold": 1, "task_state": {"loss": "cox", "train_risk": {"median": 300.0, "std": 50.0}}}]
    logits = [np.array([[1.0], [-1.0]]), np.array([[310.0], [200.0]])]       # A, B in each fold
    frame = task.ensemble(list(zip(meta, logits)))
    np.testing.assert_allclose(frame["risk"], [(1.0 + 0.2) / 2, (-1.0 - 2.0) / 2])
    assert list(frame["risk_group"]) == ["high", "low"]
    np.testing.assert_allclose(frame["fold1_risk"], [310.0, 200.0])             # each fold's own scale kept
