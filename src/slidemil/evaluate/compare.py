"""Comparing models on the same patients: the paired patient bootstrap, DeLong's test for two correlated
AUROCs, Holm's adjustment of several p-values, and average ranks with the Nemenyi critical difference
across tasks (Demsar 2006)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from slidemil.evaluate.bootstrap import patient_resamples


def paired_bootstrap(metric_a: Callable[[np.ndarray], float], metric_b: Callable[[np.ndarray], float],
                     groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """The difference metric_a - metric_b on the same resampled patients (all rows of a drawn patient
    come along): point value, 95% percentile CI, and a two-sided bootstrap p-value (twice the smaller
    share of resampled differences on either side of 0, counted as (k + 1) / (n + 1))."""
    groups = np.asarray(groups)
    point = metric_a(np.arange(len(groups))) - metric_b(np.arange(len(groups)))
    diffs = []
    for idx in patient_resamples(groups, n_boot, seed):
        d = metric_a(idx) - metric_b(idx)
        if np.isfinite(d):
            diffs.append(d)
    diffs = np.asarray(diffs)
    if not len(diffs):
        return {"diff": float(point), "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n_boot": 0}
    low, high = np.quantile(diffs, [0.025, 0.975])
    side = min((diffs <= 0).sum(), (diffs >= 0).sum())
    p = min(1.0, 2 * (side + 1) / (len(diffs) + 1))          # never 0: at most 1 / resamples of resolution
    return {"diff": float(point), "ci_low": float(low), "ci_high": float(high), "p": float(p), "n_boot": int(len(diffs))}


def _midranks(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict:
    """DeLong, DeLong & Clarke-Pearson 1988: AUROCs of two scores on the same cases, the variance of
    their difference from the structural components (fast form of Sun & Xu 2014), z and two-sided p."""
    y = np.asarray(y).astype(bool)
    scores = np.stack([np.asarray(score_a, float), np.asarray(score_b, float)])
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        return {"auc_a": float("nan"), "auc_b": float("nan"), "z": float("nan"), "p": float("nan")}
    tx = np.stack([_midranks(r) for r in pos])
    ty = np.stack([_midranks(r) for r in neg])
    tz = np.stack([_midranks(r) for r in scores[:, np.r_[np.flatnonzero(y), np.flatnonzero(~y)]]])
    auc = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n           # per positive case
    v10 = 1 - (tz[:, m:] - ty) / m       # per negative case
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = auc[0] - auc[1]
    if var <= 0:
        return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "z": 0.0 if diff == 0 else float("inf"),
                "p": 1.0 if diff == 0 else 0.0}
    z = diff / np.sqrt(var)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "z": float(z), "p": float(2 * stats.norm.sf(abs(z)))}


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of m p-values for testing them together: the i-th smallest
    becomes max_{j <= i} min(1, (m - j + 1) p_(j)); NaN stays NaN and does not count in m."""
    p = np.asarray(p_values, float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(order)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return [float(v) for v in out]


def average_ranks(table: np.ndarray) -> np.ndarray:
    """[n_tasks, k] scores (higher = better; NaN = missing, ranked last) -> average rank per column
    (1 = best; ties share the mean rank)."""
    ranks = np.stack([stats.rankdata(-np.nan_to_num(row, nan=-np.inf), method="average") for row in table])
    return ranks.mean(0)


def nemenyi_cd(k: int, n_tasks: int, alpha: float = 0.05) -> float:
    """Critical difference of average ranks for k methods over n tasks (Nemenyi; Demsar 2006, eq. 5):
    q_alpha * sqrt(k (k + 1) / (6 N)), q_alpha the studentised range quantile / sqrt(2)."""
    if k < 2:
        return float("nan")
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n_tasks)))
