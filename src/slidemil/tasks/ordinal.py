"""Ordinal grading (ISUP/Gleason grade groups, tumour grade): classes in a given order, the CORN loss.

CORN (Shi, Cao & Raschka, "Deep neural networks for rank-consistent ordinal regression based on
conditional probabilities", Pattern Anal. Appl. 2023; `coral_pytorch.losses.corn_loss`): K - 1 outputs;
output k is trained, on the bags with y > k - 1 only, to predict y > k, so sigmoid(logit_k) =
P(y > k | y > k - 1) and P(y > k) = prod_{j <= k} sigmoid(logit_j) never increases with k (rank-consistent
by construction). The predicted grade is the number of k with P(y > k) > 0.5.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slidemil.data.cohort import Cohort, parse_class_labels
from slidemil.evaluate.plots import confusion_plot
from slidemil.evaluate.regression import ORDINAL_METRICS, ordinal_metrics
from slidemil.tasks.base import TASKS, Task
from slidemil.tasks.classification import Classification

log = logging.getLogger(__name__)


def corn_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over tasks k of the binary cross-entropy of (y > k) on the bags with y > k - 1, divided by
    the number of (bag, task) terms, as `coral_pytorch.losses.corn_loss`."""
    logits = logits.float()
    total, count = logits.sum() * 0.0, 0
    for k in range(logits.shape[1]):
        keep = y > k - 1
        if keep.any():
            total = total + F.binary_cross_entropy_with_logits(logits[keep, k], (y[keep] > k).float(), reduction="sum")
            count += int(keep.sum())
    return total / max(count, 1)


def corn_probabilities(logits: np.ndarray) -> np.ndarray:
    """Class probabilities [n, K] from CORN's K - 1 conditional logits."""
    above = np.cumprod(1 / (1 + np.exp(-np.asarray(logits, float))), axis=1)      # P(y > k), k = 0..K-2
    upper = np.concatenate([np.ones((len(above), 1)), above], 1)
    lower = np.concatenate([above, np.zeros((len(above), 1))], 1)
    return upper - lower


def grade(probs: np.ndarray) -> np.ndarray:
    """The rank-consistent grade: how many P(y > k) = sum_{j > k} p_j exceed 0.5."""
    above = 1 - np.cumsum(probs, axis=1)[:, :-1]
    return (above > 0.5).sum(1)


@TASKS.register("ordinal", summary="ordered grades: CORN loss; quadratic kappa, MAE in grades")
class Ordinal(Classification):
    """Classes with an order: the label table, class probabilities, prediction columns and fold ensemble
    as classification; CORN's probabilities and rank-consistent grade instead of softmax and argmax;
    the ordinal metric set."""

    name = "ordinal"
    label_cols = ("label",)
    metric_names = ORDINAL_METRICS
    monitor_name = "qwk"

    def parse(self, raw, table, path: Path) -> Cohort:
        cohort = parse_class_labels(raw, table, path, self.o.label_col, self.o.classes)
        if not self.o.classes:     # "low" < "high" alphabetically would invert the grades: name the order used
            log.warning("%s: no --classes given for an ordinal task; the grades are ordered %s (sorted as numbers, "
                        "then text); give --classes lowest to highest if that is not their order", path,
                        " < ".join(cohort.classes))
        return cohort

    def n_outputs(self, cohort) -> int:
        return len(cohort.classes) - 1

    def loss_text(self) -> str:
        return "the rank-consistent CORN loss (Shi, Cao & Raschka 2023)"

    def loss(self, state, targets, device, n_outputs):
        return lambda logits, target: corn_loss(logits, target.long())

    def val_metric(self, state, logits, targets) -> float:
        probs = corn_probabilities(logits)
        return ordinal_metrics(np.asarray(targets, int), grade(probs), probs.shape[1])["qwk"]

    def probabilities(self, logits) -> np.ndarray:
        return corn_probabilities(logits)

    def decide(self, probs) -> np.ndarray:
        return grade(probs)

    def _indices(self, rows, classes):
        index = {c: i for i, c in enumerate(classes)}
        return rows["label"].map(index).to_numpy(int), rows["pred"].map(index).to_numpy(int)

    def usable(self, rows) -> bool:
        return rows["label"].nunique() > 1

    def score(self, rows, train, meta) -> dict:
        y, pred = self._indices(rows, meta["classes"])
        return ordinal_metrics(y, pred, len(meta["classes"]))

    def evaluate(self, preds, splits, meta, n_boot, seed) -> dict:
        """The generic per-fold and pooled bootstrap of `Task` (classification's is AUROC-specific)."""
        return {**Task.evaluate(self, preds, splits, meta, n_boot, seed), "classes": meta["classes"]}

    glossary = ("<i>Quadratic kappa</i>: agreement between predicted "
                "and true grade beyond chance, a miss by two grades costing four times a miss by one (1 perfect, 0 "
                "chance). <i>MAE</i>: mean distance in grades. <i>Accuracy</i> and <i>balanced accuracy</i> (mean "
                "recall over grades) of the rank-consistent grade.")

    def plots(self, preds, metrics, folder) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        y, pred = self._indices(self.units(preds), metrics["classes"])
        return {"confusion": confusion_plot(y, pred, metrics["classes"], folder / "confusion.png")}
