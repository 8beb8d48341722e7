"""Survival metrics are scikit-survival's, with the documented times and truncation; NaN, not an error,
where a sample cannot support one."""

from __future__ import annotations

import numpy as np
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from slidemil.evaluate.survival import IBS_POINTS, survival_at, survival_metrics


def cohort(n=150, seed=0):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t = rng.exponential(np.exp(-risk)) * 10
    c = rng.uniform(0, 25, n)
    return np.minimum(t, c), t <= c, risk + rng.normal(scale=0.5, size=n)


def test_parity_with_scikit_survival():
    time, event, risk = cohort()
    train_t, train_e, _ = cohort(seed=1)
    times = np.quantile(time[event], [0.25, 0.5, 0.75])
    s = np.exp(-np.outer(np.exp(risk), [1.0, 3.0, 8.0, 30.0]) / 10)         # a survival curve per patient
    ends = np.array([2.0, 5.0, 10.0, 30.0])
    got = survival_metrics(time, event, risk, train_t, train_e, times, tau=15.0,
                           survival=lambda grid: survival_at(grid, ends, s))
    y, y_train = Surv.from_arrays(event, time), Surv.from_arrays(train_e, train_t)
    assert got["c_index"] == concordance_index_censored(event, time, risk)[0]
    assert got["c_index_uno"] == concordance_index_ipcw(y_train, y, risk, tau=15.0)[0]
    assert got["td_auc"] == cumulative_dynamic_auc(y_train, y, risk, times)[1]
    grid = np.linspace(times.min(), times.max(), IBS_POINTS)
    s_grid = np.stack([np.interp(grid, [0, *ends], [1, *row]) for row in s])
    assert abs(got["ibs"] - integrated_brier_score(y_train, y, s_grid, grid)) < 1e-12
    assert 0.6 < got["c_index"] < 0.9


def test_undefined_metrics_are_nan():
    got = survival_metrics([1.0, 2.0], [False, False], [0.1, 0.2], [1.0, 2.0], [True, False], [1.5])
    assert np.isnan(got["c_index"]) and np.isnan(got["ibs"])
