"""Classification: cross-entropy over class logits, softmax probabilities, AUROC and friends."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from slidemil.data.cohort import Cohort, parse_class_labels
from slidemil.evaluate.bootstrap import fold_summary
from slidemil.evaluate.metrics import METRICS, bootstrap_ci, classification_metrics
from slidemil.evaluate.plots import plot_all
from slidemil.evaluate.report import heatmap_gallery
from slidemil.tasks.base import TASKS, Task


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), 1).numpy()


@TASKS.register("classification", summary="class labels: cross-entropy, softmax, AUROC")
class Classification(Task):
    """Today's behaviour since slidemil 0.1; run folders without a `task` are classification."""

    name = "classification"
    label_cols = ("label",)
    metric_names = METRICS
    monitor_name = "auroc"

    def parse(self, raw, table, path: Path) -> Cohort:
        return parse_class_labels(raw, table, path, self.o.label_col, self.o.classes)

    def loss_text(self) -> str:
        return "cross-entropy" + (", each bag weighted n / (C n_c) by the inverse frequency of its class"
                                  if self.o.class_weights == "balanced" else "")

    def loss(self, state, targets, device, n_outputs: int):
        """Cross-entropy, optionally weighted n / (C * n_c) ("balanced", as scikit-learn's `class_weight`).

        The weighted loss is the plain mean of w_y * CE over the step's bags, as a scikit-learn objective
        sums sample-weighted losses. Not torch's `weight=` mean, which divides by the step's summed
        weights: at one bag a step (the default) that cancels the weight, and `--class-weights balanced`
        trained exactly as without it."""
        if self.o.class_weights != "balanced":
            return lambda logits, target: F.cross_entropy(logits.float(), target)
        counts = np.bincount(np.asarray(targets, int), minlength=n_outputs).astype(float)
        weight = torch.tensor(len(targets) / (n_outputs * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        return lambda logits, target: (weight[target] * F.cross_entropy(logits.float(), target, reduction="none")).mean()

    def val_metric(self, state, logits, targets) -> float:
        return classification_metrics(np.asarray(targets, int), softmax(logits))["auroc"]

    def balanced_weights(self, targets) -> np.ndarray:
        targets = np.asarray(targets, int)
        return 1.0 / np.bincount(targets)[targets]

    # How logits become class probabilities and the predicted class (ordinal grading overrides both).
    def probabilities(self, logits) -> np.ndarray:
        return softmax(logits)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return probs.argmax(1)

    def _columns(self, probs: np.ndarray, classes: list[str]) -> dict:
        cols = {f"prob_{name}": probs[:, c] for c, name in enumerate(classes)}
        cols["pred"] = np.array([classes[i] for i in self.decide(probs)], dtype=object)
        return cols

    def columns(self, state, logits, meta) -> dict:
        return self._columns(self.probabilities(logits), meta["classes"])

    def ensemble(self, folds) -> pd.DataFrame:
        """Fold-mean class probabilities and the class they decide; each fold's probabilities after."""
        classes = folds[0][0]["classes"]
        per_fold = [self.probabilities(logits) for _, logits in folds]
        frame = pd.DataFrame(self._columns(np.mean(per_fold, axis=0), classes))
        for (meta, _), probs in zip(folds, per_fold):
            for c, name in enumerate(classes):
                frame[f"fold{meta['fold']}_prob_{name}"] = probs[:, c]
        return frame

    has_baseline = True
    baseline_name = "logistic regression on mean-pooled features (C tuned by patient-grouped inner CV)"

    def baseline_columns(self, x_fit, y_fit, groups, x_test, meta, seed) -> dict:
        """Standardised features, L2 logistic regression; C from 10 values in 1e-4..1e4 by inner stratified,
        patient-grouped CV (AUROC for two classes, log-loss otherwise)."""
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
        from sklearn.model_selection import StratifiedGroupKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        y = np.asarray(y_fit, int)
        n_classes = len(meta["classes"])
        k = min(5, int(np.bincount(y, minlength=n_classes)[np.unique(y)].min()), len(set(groups)))
        if k >= 2:
            inner = list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(x_fit, y, groups))
            clf = LogisticRegressionCV(Cs=10, cv=inner, max_iter=5000,
                                       scoring="roc_auc" if n_classes == 2 else "neg_log_loss")
        else:  # too few bags of a class to tune: scikit-learn's default C
            clf = LogisticRegression(max_iter=5000)
        with warnings.catch_warnings():   # scikit-learn 1.8 announces LogisticRegressionCV API changes
            warnings.simplefilter("ignore", FutureWarning)
            model = make_pipeline(StandardScaler(), clf).fit(x_fit, y)
        probs = np.zeros((len(x_test), n_classes))
        probs[:, model.classes_] = model.predict_proba(x_test)
        return self._columns(probs, meta["classes"])

    def _truth(self, preds: pd.DataFrame, classes: list[str]):
        y = preds["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        return y, preds[[f"prob_{c}" for c in classes]].to_numpy(float)

    def averaged(self, column) -> bool:
        return column.startswith("prob_") or (column.startswith("fold") and "_prob_" in column)

    def decide_units(self, rows) -> pd.DataFrame:
        names = [c[len("prob_"):] for c in rows.columns if c.startswith("prob_")]
        if "pred" in rows.columns and names:
            rows["pred"] = np.array(names, dtype=object)[self.decide(rows[[f"prob_{n}" for n in names]].to_numpy(float))]
        return rows

    def evaluate(self, preds, splits, meta, n_boot, seed) -> dict:
        """Per fold and pooled with patient-bootstrap CIs, on `units` (one row per patient by default)."""
        classes = meta["classes"]
        rows = self.units(preds)
        y, probs = self._truth(rows, classes)
        per_fold = {}
        if "fold" in rows.columns:
            for fold, part in rows.groupby("fold"):
                idx = part.index.to_numpy()
                per_fold[int(fold)] = {**classification_metrics(y[idx], probs[idx]),
                                       "n_slides": int(preds["fold"].eq(fold).sum())}
        return {"task": self.name, "classes": classes, **self.unit_counts(preds, rows),
                "bootstrap": {"resamples": n_boot, "unit": "patient"},
                "pooled": bootstrap_ci(y, probs, rows["case_id"].to_numpy(), n_boot=n_boot, seed=seed),
                "folds": per_fold, "fold_summary": fold_summary(per_fold, METRICS)}

    def prediction_columns(self, meta) -> list[str]:
        return [f"prob_{c}" for c in meta["classes"]]

    glossary = ("<i>AUROC</i>: the chance that a random patient of the positive class gets a higher probability than a "
                "random one of the negative class (multi-class: the mean over classes, one against the rest); 0.5 is "
                "chance; it does not depend on a threshold. <i>AUPRC</i>: average precision of the positive class "
                "(multi-class: mean over classes); its chance level is the class's prevalence. <i>Balanced accuracy"
                "</i>, <i>accuracy</i>, <i>macro F1</i>: of the predicted class, the most probable one (no threshold "
                "was tuned on these data); balanced accuracy is the mean recall over classes, so a majority-class "
                "guess scores 1 / classes.")

    def report_notes(self, metrics) -> str:
        """The glossary, and why a value is n/a."""
        undefined = [m for m, v in metrics.get("pooled", {}).items() if v["value"] != v["value"]]
        why = (f"<p class=note><b>n/a here</b> ({', '.join(undefined)}): the scored sample holds one class only, where "
               "a ranking metric has nothing to rank.</p>" if undefined else "")
        return super().report_notes(metrics) + why

    def gallery(self, preds, meta, folder) -> list:
        return heatmap_gallery(preds, meta["classes"], folder)

    def plots(self, preds, metrics, folder) -> dict:
        classes = metrics["classes"]
        rows = self.units(preds)
        y, probs = self._truth(rows, classes)
        return plot_all(y, probs, classes, folder, groups=rows["case_id"].to_numpy())
