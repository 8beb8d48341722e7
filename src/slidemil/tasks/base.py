"""What a prediction task is: the one interface every stage asks instead of assuming classes.

A `Task` parses and checks its targets in the label table, gives the strata that splits balance, says
how many outputs the aggregator needs, owns the loss and its per-fold state (survival bins, regression
scaling: fitted on the training part of a fold only and kept in `model.json`), turns logits into the
columns of `predictions.csv`, names the validation metric, and computes its metric set with patient-
bootstrap CIs, its plots and its one-line summary. `TASKS` is the registry (`--task NAME`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slidemil.data.cohort import Cohort, read_table
from slidemil.errors import InputError
from slidemil.evaluate.bootstrap import fold_summary, patient_bootstrap
from slidemil.utils.config import describe
from slidemil.utils.registry import Registry

TASKS = Registry("task")


class TaskConfig(BaseModel):
    """The task's options; `TrainConfig` inherits them, so they are flags and YAML keys of `train`."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    task: str = Field("classification", description="classification | survival | regression | ordinal.")
    label_col: str = Field("label", description="Label column (classification, ordinal).")
    slide_col: str = Field("slide_id", description="Slide id column.")
    case_col: str = Field("case_id", description="Patient id column.")
    site_col: Optional[str] = Field(None, description="Site (centre) column: per-site metrics in the report, --cv "
                                                           "leave-site-out, --preserve-site.")
    classes: Optional[list[str]] = Field(None, description="Comma-separated class order, e.g. negative,positive "
                                                           "(ordinal: lowest grade first).")
    time_col: str = Field("time", description="Survival: follow-up time column (> 0).")
    event_col: str = Field("event", description="Survival: event column (1/true = event observed, 0/false = censored).")
    target_col: str = Field("target", description="Regression: target column.")
    survival_loss: Literal["nll", "cox"] = Field("nll", description="Survival loss: nll (discrete-time, Zadeh & "
                                                                   "Schmid) | cox (partial likelihood, Breslow ties).")
    bins: int = Field(4, ge=2, le=20, description="Survival NLL: time bins from the quantiles of the training "
                                                  "fold's event times.")
    alpha_surv: float = Field(0.0, ge=0.0, le=1.0, description="Survival NLL: extra weight on uncensored patients "
                                                               "(0 = plain likelihood, as Patch-GCN's runs).")
    eval_times: Optional[list[float]] = Field(None, description="Survival: times for the time-dependent AUC "
                                                                "(default: quartiles of the event times).")
    ibs_range: str = Field("follow-up", description="Survival: the integrated Brier score's time range: follow-up "
                                                    "(the observed follow-up, as pycox and most papers), event-iqr "
                                                    "(25th-75th percentile of event times), or two quantiles of "
                                                    "the event times, e.g. 0.1,0.9.")
    eval_unit: Literal["patient", "slide"] = Field("patient", description="Metrics per patient (a patient's slides "
                                                   "averaged, per label) or per slide.")
    regression_loss: Literal["mse", "huber"] = Field("mse", description="Regression loss on the standardised target.")
    class_weights: Literal["none", "balanced"] = Field("none", description="none | balanced (classification).")

    @field_validator("task")
    @classmethod
    def _known(cls, value):
        TASKS.info(value)
        return value

    @field_validator("ibs_range")
    @classmethod
    def _ibs_range(cls, value):
        if value in ("follow-up", "event-iqr"):
            return value
        try:
            q = [float(v) for v in str(value).split(",")]
        except ValueError:
            q = []
        if len(q) != 2 or not 0 <= q[0] < q[1] <= 1:
            raise ValueError(f"{value!r} is not follow-up, event-iqr or two quantiles such as 0.1,0.9")
        return f"{q[0]:g},{q[1]:g}"

    @field_validator("classes", "eval_times", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


# the options only some tasks read: a run's report shows those of its own task (config.yaml keeps them all)
TASK_ONLY = {"label_col": ("classification", "ordinal"), "classes": ("classification", "ordinal"),
             "class_weights": ("classification", "ordinal"), "time_col": ("survival",), "event_col": ("survival",),
             "survival_loss": ("survival",), "bins": ("survival",), "alpha_surv": ("survival",),
             "eval_times": ("survival",), "ibs_range": ("survival",), "target_col": ("regression",),
             "regression_loss": ("regression",)}


def own_options(cfg: dict) -> dict:
    """A run's config without the options of the tasks it is not (a classification run's survival loss)."""
    task = cfg.get("task", "classification")
    return {k: v for k, v in cfg.items() if task in TASK_ONLY.get(k, (task,))}


class Task:
    """Base of the registered tasks; see the module docstring for what each method is for."""

    name: ClassVar[str]
    label_cols: ClassVar[tuple[str, ...]]        # cohort columns copied into predictions.csv as the truth
    metric_names: ClassVar[tuple[str, ...]]      # the metric set of metrics.json, headline first
    monitor_name: ClassVar[str]                  # what `--monitor val_metric` follows (higher is better)

    def __init__(self, options: TaskConfig | None = None):
        self.o = options or TaskConfig(task=self.name)

    # -- label table --------------------------------------------------------------------------------
    def read(self, path) -> Cohort:
        """The label table as a cohort of this task; every problem is an InputError naming row and column."""
        raw, table = read_table(path, slide_col=self.o.slide_col, case_col=self.o.case_col, site_col=self.o.site_col,
                                needed=self.needed_columns())
        cohort = self.parse(raw, table, Path(path))
        # rows the task dropped (an empty label, time or target: warned as they go) are recorded as excluded
        dropped = table[~table["slide_id"].isin(set(cohort.table["slide_id"]))]
        reasons = {sid: f"{path} row {i + 2}: no value in a column the {self.name} task needs "
                   f"({', '.join(self.needed_columns())})" for i, sid in zip(dropped.index, dropped["slide_id"])}
        return cohort.with_table(cohort.table, {**reasons, **cohort.excluded}) if reasons else cohort

    def needed_columns(self) -> dict[str, str]:
        """Label-table columns this task reads -> the flag that names each."""
        return {self.o.label_col: "--label-col"}

    def parse(self, raw: pd.DataFrame, table: pd.DataFrame, path: Path) -> Cohort:
        raise NotImplementedError

    strata_text: ClassVar[str] = "stratified by class"      # what `strata` balances, for the methods text

    def strata(self, table: pd.DataFrame, folds: int) -> np.ndarray:
        """An integer per row that the splits keep balanced across folds."""
        return table["y"].to_numpy()

    def check_splits(self, splits: pd.DataFrame, table: pd.DataFrame) -> None:
        """Refuse folds this task cannot train or score (survival: a fold without events)."""

    # -- training -----------------------------------------------------------------------------------
    def n_outputs(self, cohort: Cohort) -> int:
        return len(cohort.classes)

    def fit_state(self, train: pd.DataFrame) -> dict:
        """What the task learns from a fold's training rows (never its test rows); JSON-able."""
        return {}

    def loss_text(self) -> str:
        """The training loss as a methods section names it (with its paper)."""
        raise NotImplementedError

    def loss(self, state: dict, targets: np.ndarray, device, n_outputs: int):
        """`loss(logits [B, K], target [B, ...]) -> scalar` for this fold."""
        raise NotImplementedError

    def val_loss(self, task_loss, logits: torch.Tensor, targets) -> float:
        """The validation loss: the mean of the per-bag losses."""
        y = torch.as_tensor(np.asarray(targets), device=logits.device)
        y = y.float() if y.is_floating_point() else y.long()
        return float(np.mean([float(task_loss(logits[i:i + 1], y[i:i + 1])) for i in range(len(logits))]))

    def val_metric(self, state: dict, logits: np.ndarray, targets: np.ndarray) -> float:
        raise NotImplementedError

    uses_training_predictions: ClassVar[bool] = False

    def after_fit(self, state: dict, train_logits: np.ndarray, train_targets: np.ndarray) -> dict:
        """The state completed with what the trained model predicts on its own training rows (and their
        targets: survival's Breslow baseline hazard needs both)."""
        return state

    def balanced_weights(self, targets: np.ndarray) -> np.ndarray:
        """Per-bag sampling weights for --balanced-sampling (inverse class frequency)."""
        raise InputError(f"--balanced-sampling needs classes; task {self.name!r} has none")

    # -- predictions --------------------------------------------------------------------------------
    def columns(self, state: dict, logits: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
        """Prediction columns of one fold model (`meta`: its model.json)."""
        raise NotImplementedError

    def ensemble(self, folds: list[tuple[dict, np.ndarray]]) -> pd.DataFrame:
        """`predict`'s columns from every fold model's (model.json, logits): the fold ensemble first,
        then each fold's own columns."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------------------
    def prediction_columns(self, meta: dict) -> list[str]:
        """Columns predictions.csv must have for `evaluate`."""
        return [*self.label_cols, "pred"]

    def score(self, preds: pd.DataFrame, train: pd.DataFrame | None, meta: dict) -> dict[str, float]:
        """The metric set on `preds` (train: the labelled rows the model was fitted on, for IPCW)."""
        raise NotImplementedError

    def evaluate(self, preds: pd.DataFrame, splits: pd.DataFrame | None, meta: dict, n_boot: int, seed: int) -> dict:
        """metrics.json's body: per fold and pooled, each metric with a patient-bootstrap CI, on `units`."""
        rows = self.units(preds)
        per_fold = {}
        if "fold" in rows.columns:
            for fold, part in rows.groupby("fold"):
                per_fold[int(fold)] = {**self.score(part, self.training_rows(rows, splits, fold), meta),
                                       "n_slides": int(preds["fold"].eq(fold).sum())}
        pooled = patient_bootstrap(lambda idx: self.score(rows.iloc[idx], rows, meta), rows["case_id"].to_numpy(),
                                   n_boot, seed, usable=lambda idx: self.usable(rows.iloc[idx]))
        return {"task": self.name, **self.unit_counts(preds, rows),
                "bootstrap": {"resamples": n_boot, "unit": "patient"}, "pooled": pooled, "folds": per_fold,
                "fold_summary": fold_summary(per_fold, self.metric_names)}

    def unit_counts(self, preds: pd.DataFrame, rows: pd.DataFrame) -> dict:
        return {"unit": self.o.eval_unit, "n_units": int(len(rows)), "n_slides": int(len(preds)),
                "n_patients": int(preds["case_id"].nunique())}

    def units(self, preds: pd.DataFrame) -> pd.DataFrame:
        """The rows metrics are computed on. `--eval-unit patient` (default): one row per patient, its slides'
        prediction columns averaged (as the fold ensemble averages fold models) and the decision taken
        again on the average, so a patient with three slides counts once; slides of one patient with
        different labels stay separate rows (one per patient and label). `--eval-unit slide`: one per slide."""
        preds = preds.reset_index(drop=True)
        if self.o.eval_unit == "slide" or preds["case_id"].is_unique:
            return preds
        keys = ["case_id", *[c for c in self.label_cols if c in preds.columns]]
        mean = [c for c in preds.columns if c not in keys and self.averaged(c)]
        agg = {c: "mean" for c in mean} | {c: "first" for c in preds.columns if c not in keys and c not in mean}
        return self.decide_units(preds.groupby(keys, sort=False, dropna=False).agg(agg).reset_index())

    def averaged(self, column: str) -> bool:
        """Whether a prediction column is averaged over a patient's slides (else its first value is kept)."""
        return False

    def decide_units(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Columns decided from the averaged ones (the predicted class, the risk group), taken again."""
        return rows

    def training_rows(self, rows: pd.DataFrame, splits: pd.DataFrame | None, fold: int) -> pd.DataFrame | None:
        return None

    def usable(self, rows: pd.DataFrame) -> bool:
        """Whether a bootstrap resample can be scored at all."""
        return True

    def plots(self, preds: pd.DataFrame, metrics: dict, folder: Path) -> dict[str, Path]:
        return {}

    def gallery(self, preds: pd.DataFrame, meta: dict, folder: Path) -> list:
        """The report's heatmap gallery: [(section title, [(caption, heatmap path)])]."""
        return []

    def summary(self, metrics: dict) -> str:
        """One line: the headline metric with its CI."""
        name = self.metric_names[0]
        m = metrics["pooled"][name]
        return f"{HEADLINES.get(name, name)} {_fmt(m['value'])} (95% CI {_fmt(m['ci_low'])}-{_fmt(m['ci_high'])})"

    # what each number of the metric set means, for the report (HTML)
    glossary: ClassVar[str] = ""

    def methods_notes(self, metrics: dict) -> str:
        """What the methods paragraph must add about this task's metrics (times, windows), plain text."""
        return ""

    def report_notes(self, metrics: dict) -> str:
        """Task-specific text for the report (HTML, escaped by the task): by default the glossary."""
        return f"<p class=note><b>What the numbers mean.</b> {self.glossary}</p>" if self.glossary else ""

    # The reference baseline (train/baseline.py): a tuned linear model on mean-pooled features.
    has_baseline = False
    baseline_name = ""

    def baseline_columns(self, x_fit, y_fit, groups, x_test, meta: dict, seed: int) -> dict:
        """The baseline fitted on (x_fit, y_fit), tuned by a patient-grouped inner CV, as prediction columns of
        x_test (the same columns as the model's)."""
        raise NotImplementedError


HEADLINES = {"auroc": "AUROC", "c_index": "C-index", "pearson_r": "Pearson r", "qwk": "quadratic kappa"}


def _fmt(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def create_task(options: TaskConfig | dict | None = None, source=None) -> Task:
    """The task named by `options.task` (a `TaskConfig`, or a dict such as a run's config.yaml, `source`)."""
    if isinstance(options, dict):
        try:
            options = TaskConfig(**{k: v for k, v in options.items() if k in TaskConfig.model_fields})
        except ValidationError as exc:
            raise InputError(f"{source or 'task options'}: {describe(exc)}") from None
    options = options or TaskConfig()
    return TASKS.info(options.task).obj(options)


def model_task(meta: dict) -> Task:
    """The task a fold model was trained for, from its model.json (models from before tasks: classification)."""
    return create_task({"task": meta.get("task", "classification"), **meta.get("task_options", {})})
