"""Evaluation plots (matplotlib `Figure` objects, no pyplot): ROC, precision-recall, confusion matrix,
calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from slidemil.evaluate.bootstrap import patient_resamples
from slidemil.utils.figures import new_figure, save_figure


def _curves(y, probs, classes):
    """(name, binary truth, score) per curve: the positive class for binary tasks, else one-vs-rest."""
    targets = [1] if len(classes) == 2 else range(len(classes))
    return [(classes[c], (y == c).astype(int), probs[:, c]) for c in targets if 0 < (y == c).sum() < len(y)]


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def curve_bands(truth, score, groups, n_boot: int = 200, seed: int = 0):
    """95% bands of the ROC (TPR at a fixed FPR grid) and PR (precision at a fixed recall grid) curves,
    from a bootstrap over patients."""
    grid = np.linspace(0, 1, 101)
    rocs, prs = [], []
    for idx in patient_resamples(groups, n_boot, seed):
        t, s = truth[idx], score[idx]
        if t.min() == t.max():
            continue
        fpr, tpr, _ = roc_curve(t, s)
        rocs.append(np.interp(grid, fpr, tpr))
        prec, rec, _ = precision_recall_curve(t, s)
        prs.append(np.interp(grid, rec[::-1], prec[::-1]))
    if not rocs:
        return None
    q = lambda a: np.quantile(np.asarray(a), [0.025, 0.975], axis=0)  # noqa: E731
    return grid, q(rocs), q(prs)


def confusion_plot(y, pred, classes: list[str], path: Path) -> Path:
    """Counts of true (rows) against predicted (columns) class indices."""
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    fig, ax = new_figure((1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    # the scale from 0: with matplotlib's own (min to max) a matrix of equal counts was drawn in the palest blue
    # with white numbers, an empty-looking panel
    top = max(int(cm.max()), 1)
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=top)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _save(fig, path)


def plot_all(y: np.ndarray, probs: np.ndarray, classes: list[str], folder: Path,
             groups: np.ndarray | None = None) -> dict[str, Path]:
    """ROC and PR curves (with 95% patient-bootstrap bands for binary tasks when `groups` is given),
    confusion matrix and calibration plot."""
    folder.mkdir(parents=True, exist_ok=True)
    curves = _curves(y, probs, classes)
    bands = curve_bands(curves[0][1], curves[0][2], groups) if groups is not None and len(curves) == 1 else None
    paths = {}

    fig, ax = new_figure((4.5, 4.5))
    if bands:
        ax.fill_between(bands[0], bands[1][0], bands[1][1], alpha=0.25, label="95% CI (patient bootstrap)")
    for name, truth, score in curves:
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (out-of-fold)")
    ax.legend(loc="lower right")
    paths["roc"] = _save(fig, folder / "roc.png")

    fig, ax = new_figure((4.5, 4.5))
    if bands:
        ax.fill_between(bands[0], bands[2][0], bands[2][1], alpha=0.25, label="95% CI (patient bootstrap)")
    for name, truth, score in curves:
        prec, rec, _ = precision_recall_curve(truth, score)
        ax.plot(rec, prec, label=f"{name} (prevalence {truth.mean():.2f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (out-of-fold)", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    paths["pr"] = _save(fig, folder / "pr.png")

    paths["confusion"] = confusion_plot(y, probs.argmax(1), classes, folder / "confusion.png")

    fig, ax = new_figure((4.5, 4.5))
    bins = max(3, min(10, len(y) // 10))
    for name, truth, score in curves:
        frac, mean_pred = calibration_curve(truth, score, n_bins=bins, strategy="quantile")
        ax.plot(mean_pred, frac, "o-", label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    paths["calibration"] = _save(fig, folder / "calibration.png")
    return paths
