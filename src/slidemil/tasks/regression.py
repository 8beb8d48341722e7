"""Regression: a continuous target (a biomarker, a score), standardised with the training fold's mean and
SD; MSE or Huber loss; Pearson r, Spearman rho, R^2 and MAE on one row per patient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch.nn.functional as F

from slidemil.data.cohort import Cohort, drop_empty, numeric_column, same_per_patient
from slidemil.errors import InputError
from slidemil.evaluate.regression import REGRESSION_METRICS, regression_metrics, scatter_plot
from slidemil.evaluate.report import outcome_gallery
from slidemil.tasks.base import TASKS, Task


@TASKS.register("regression", summary="a continuous target: MSE/Huber on the standardised value; Pearson r, R^2")
class Regression(Task):
    name = "regression"
    label_cols = ("target",)
    metric_names = REGRESSION_METRICS
    monitor_name = "pearson_r"

    def needed_columns(self) -> dict[str, str]:
        return {self.o.target_col: "--target-col"}

    def parse(self, raw, table, path: Path) -> Cohort:
        col = self.o.target_col
        table = table.copy()
        table["target"] = raw[col].str.strip()
        table = drop_empty(table, "target", path, col, numeric=True)   # left out, warned, in excluded.csv (as classification)
        table["target"] = numeric_column(raw, table, path, col, "the regression target").astype(float)
        same_per_patient(table, ["target"], path, [col])
        if table["target"].nunique() < 2:
            raise InputError(f"{path}: column {col!r} is constant ({table['target'].iloc[0]:g} in every row); "
                             "there is nothing to regress")
        return Cohort(table.reset_index(drop=True), [], str(path), target_cols=("target",), label_cols=("target",))

    strata_text = "stratified by target quantile"

    def strata(self, table, folds) -> np.ndarray:
        """Target quantiles per patient (fewer when a quantile would hold fewer patients than folds)."""
        patients = table.drop_duplicates("case_id")
        for q in (4, 3, 2, 1):
            strata = pd.qcut(patients["target"].rank(method="first"), q, labels=False).to_numpy()
            if np.bincount(strata).min() >= folds or q == 1:
                break
        return table["case_id"].map(dict(zip(patients["case_id"], strata))).to_numpy()

    def n_outputs(self, cohort) -> int:
        return 1

    def fit_state(self, train) -> dict:
        """Mean and SD of the training fold's targets: the model learns (y - mean) / SD."""
        y = train["target"].to_numpy(float)
        sd = float(y.std())
        return {"mean": float(y.mean()), "sd": sd if sd > 0 else 1.0}

    def loss_text(self) -> str:
        return (f"{'mean squared error' if self.o.regression_loss == 'mse' else 'the Huber loss'} on the target "
                "standardised with each training fold's mean and SD")

    def loss(self, state, targets, device, n_outputs):
        fn = F.mse_loss if self.o.regression_loss == "mse" else F.huber_loss
        mean, sd = state["mean"], state["sd"]
        return lambda logits, target: fn(logits.float()[:, 0], (target.float().view(-1) - mean) / sd)

    has_baseline = True
    baseline_name = "ridge regression on mean-pooled features (alpha tuned by patient-grouped inner CV)"

    def baseline_columns(self, x_fit, y_fit, groups, x_test, meta, seed) -> dict:
        """Standardised features, ridge; alpha from 13 values in 1e-3..1e3 by inner patient-grouped CV."""
        from sklearn.linear_model import RidgeCV
        from sklearn.model_selection import GroupKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        k = min(5, len(set(groups)))
        inner = list(GroupKFold(k).split(x_fit, y_fit, groups)) if k >= 2 else None
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13), cv=inner))
        return {"pred": model.fit(x_fit, np.asarray(y_fit, float)).predict(x_test)}

    def predict(self, state, logits) -> np.ndarray:
        return np.asarray(logits, float)[:, 0] * state["sd"] + state["mean"]

    def val_metric(self, state, logits, targets) -> float:
        return regression_metrics(np.asarray(targets, float), self.predict(state, logits))["pearson_r"]

    def columns(self, state, logits, meta) -> dict:
        return {"pred": self.predict(state, logits)}

    def ensemble(self, folds) -> pd.DataFrame:
        per_fold = [self.predict(meta["task_state"], logits) for meta, logits in folds]
        frame = pd.DataFrame({"pred": np.mean(per_fold, 0)})
        for (meta, _), pred in zip(folds, per_fold):
            frame[f"fold{meta['fold']}_pred"] = pred
        return frame

    def averaged(self, column) -> bool:
        return column == "pred" or (column.startswith("fold") and column.endswith("_pred"))

    def usable(self, rows) -> bool:
        return rows["target"].nunique() > 1

    def score(self, rows, train, meta) -> dict:
        return regression_metrics(rows["target"].to_numpy(float), rows["pred"].to_numpy(float))

    glossary = ("<i>Pearson r</i>: linear correlation of predicted and "
                "true values; <i>Spearman rho</i>: the same on ranks; <i>R^2</i>: the share of the target's "
                "variance explained (0 = predicting the mean, negative = worse); <i>MAE</i>: mean absolute error in "
                "the target's units. One row per patient.")

    def gallery(self, preds, meta, folder) -> list:
        """Heatmaps of the highest and lowest predictions, then every other one made."""
        return outcome_gallery(preds, "pred", "prediction", folder, lambda r: f"target {r['target']:g}")

    def plots(self, preds, metrics, folder) -> dict:
        rows = self.units(preds)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scatter.png"
        scatter_plot(rows["target"], rows["pred"], path)
        return {"scatter": path}

