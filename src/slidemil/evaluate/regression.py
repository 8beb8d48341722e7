"""Regression and ordinal-grading metrics (SciPy, scikit-learn) and their plots."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    mean_absolute_error,
    r2_score,
)

from slidemil.utils.figures import new_figure, save_figure

REGRESSION_METRICS = ("pearson_r", "spearman_r", "r2", "mae")
ORDINAL_METRICS = ("qwk", "mae", "accuracy", "balanced_accuracy")


def _nan_if_constant(fn, a, b) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def regression_metrics(y, pred) -> dict[str, float]:
    """Pearson r, Spearman rho, R^2 (1 - SS_res / SS_tot: a constant prediction at the mean scores 0) and MAE."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    return {"pearson_r": _nan_if_constant(stats.pearsonr, y, pred),
            "spearman_r": _nan_if_constant(stats.spearmanr, y, pred),
            "r2": float(r2_score(y, pred)) if len(y) > 1 and np.ptp(y) > 0 else float("nan"),
            "mae": float(mean_absolute_error(y, pred))}


def ordinal_metrics(y, pred, n_classes: int) -> dict[str, float]:
    """Quadratic-weighted kappa, mean absolute error in grades, accuracy, balanced accuracy (grade indices)."""
    y, pred = np.asarray(y, int), np.asarray(pred, int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qwk = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(n_classes)))
        bacc = balanced_accuracy_score(y, pred)
    return {"qwk": float(qwk) if np.isfinite(qwk) else float("nan"), "mae": float(np.abs(y - pred).mean()),
            "accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(bacc)}


def scatter_plot(y, pred, path, name: str = "target") -> None:
    fig, ax = new_figure((4.5, 4.5))
    ax.scatter(y, pred, s=14, alpha=0.7)
    lo, hi = float(min(np.min(y), np.min(pred))), float(max(np.max(y), np.max(pred)))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title="Predicted vs true (out-of-fold)")
    save_figure(fig, path, dpi=110, bbox_inches="tight")
