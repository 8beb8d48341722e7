"""The patient bootstrap behind every confidence interval: resample patients with replacement (all rows
of a drawn patient come along), recompute the metric set, take percentiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def patient_resamples(groups: np.ndarray, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """`n_boot` row-index arrays, each drawing as many patients as there are, with replacement; all rows
    of a drawn patient come along."""
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


def patient_bootstrap(metric_fn: Callable[[np.ndarray], dict[str, float]], groups: np.ndarray, n_boot: int = 1000,
                      seed: int = 0, alpha: float = 0.05,
                      usable: Callable[[np.ndarray], bool] | None = None) -> dict[str, dict[str, float]]:
    """{metric: {value, ci_low, ci_high, n_boot}}. `metric_fn(idx)` scores the rows `idx`; the point
    estimate is `metric_fn` on all rows. A resample that `usable(idx)` rejects (one class only, no event)
    is skipped, and so are non-finite values; `n_boot` reports how many resamples each CI rests on."""
    groups = np.asarray(groups)
    point = metric_fn(np.arange(len(groups)))
    samples = {k: [] for k in point}
    for idx in patient_resamples(groups, n_boot, seed):
        if usable is not None and not usable(idx):
            continue
        for k, v in metric_fn(idx).items():
            samples[k].append(v)
    result = {}
    for k, value in point.items():
        vals = np.asarray([v for v in samples[k] if np.isfinite(v)])
        low, high = (np.quantile(vals, [alpha / 2, 1 - alpha / 2]) if len(vals) else (np.nan, np.nan))
        result[k] = {"value": float(value), "ci_low": float(low), "ci_high": float(high), "n_boot": int(len(vals))}
    return result


def fold_summary(per_fold: dict, names) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over folds of each metric (NaN folds left out)."""
    out = {}
    for m in names:
        vals = np.array([f[m] for f in per_fold.values()], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[m] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")}
    return out
