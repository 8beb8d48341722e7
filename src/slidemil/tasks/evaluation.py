"""`slidemil evaluate`: a run's pooled and per-fold metrics with patient-bootstrap CIs (metrics.json),
its plots and report.html, all by the run's task."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from slidemil.errors import InputError
from slidemil.evaluate.report import write_report
from slidemil.rundir import RunDir
from slidemil.tasks.base import Task, create_task
from slidemil.utils.io import write_json


def run_task(run: RunDir) -> tuple[Task, dict, dict]:
    """(task, config.yaml, what the metrics need from it) of a finished run; runs from before tasks
    existed are classification."""
    if not run.predictions_path.is_file() or not run.config_path.is_file():
        raise InputError(f"{run.path} is not a finished run folder (needs predictions.csv and config.yaml)")
    cfg = run.config()
    task = create_task(cfg)
    meta = {"classes": [str(c) for c in cfg["slidemil"]["classes"]], "loss": cfg.get("survival_loss")}
    return task, cfg, meta


def evaluate_run(run: str | Path | RunDir, n_boot: int = 1000, seed: int = 0,
                 heatmaps: str | Path | None = None) -> dict:
    """Pooled out-of-fold metrics with patient-bootstrap CIs, per-fold metrics, plots and the report."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    task, cfg, meta = run_task(run)
    preds = run.predictions()
    missing = [c for c in task.prediction_columns(meta) if c not in preds.columns]
    if missing:
        raise InputError(f"{run.predictions_path}: columns {', '.join(missing)} are missing")
    splits = pd.read_csv(run.splits_path, dtype={"slide_id": str, "case_id": str}) if run.splits_path.is_file() else None
    metrics = task.evaluate(preds, splits, meta, n_boot, seed)
    plots = task.plots(preds, metrics, run.plots_dir)
    write_json(run.metrics_path, metrics)
    gallery = task.gallery(preds, meta, Path(heatmaps) if heatmaps else run.heatmaps_dir)
    write_report(run, cfg, metrics, plots, gallery, task.report_notes(metrics))
    return metrics


def summary_line(metrics: dict) -> str:
    """The headline metric of a metrics.json with its CI, e.g. "AUROC 0.912 (95% CI 0.85-0.96)"."""
    return create_task({"task": metrics.get("task", "classification")}).summary(metrics)
