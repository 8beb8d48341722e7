"""Classification metrics (scikit-learn) and their patient-level bootstrap confidence intervals."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from slidemil.evaluate.bootstrap import patient_bootstrap

METRICS = ("auroc", "auprc", "balanced_accuracy", "accuracy", "macro_f1")


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUROC (binary, or macro one-vs-rest), AUPRC (binary AP of the positive class, or macro AP),
    balanced accuracy, accuracy, macro F1. Predictions are argmax of `probs` [n, C]: no threshold is
    tuned on the data being scored. A metric undefined on this sample (one class only) is NaN."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    out = {
        "balanced_accuracy": _quiet(balanced_accuracy_score, y, pred),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
    }
    present = np.unique(y)
    if len(present) < 2:
        out["auroc"] = out["auprc"] = float("nan")
    elif n_classes == 2:
        out["auroc"] = float(roc_auc_score(y, probs[:, 1]))
        out["auprc"] = float(average_precision_score(y, probs[:, 1]))
    else:
        onehot = np.eye(n_classes)[y]
        cols = [c for c in range(n_classes) if 0 < onehot[:, c].sum() < len(y)]
        out["auroc"] = float(np.mean([roc_auc_score(onehot[:, c], probs[:, c]) for c in cols]))
        out["auprc"] = float(np.mean([average_precision_score(onehot[:, c], probs[:, c]) for c in cols]))
    return {k: out[k] for k in METRICS}


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args))


def bootstrap_ci(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile CI of every metric, resampling *patients* with replacement
    (all slides of a drawn patient come along), so correlated slides do not narrow the interval."""
    y, probs = np.asarray(y), np.asarray(probs)
    return patient_bootstrap(lambda idx: classification_metrics(y[idx], probs[idx]), groups, n_boot, seed, alpha,
                             usable=lambda idx: len(np.unique(y[idx])) >= 2)
