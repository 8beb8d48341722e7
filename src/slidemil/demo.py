"""`slidemil demo`: the main job end to end on a synthetic feature cohort, offline, in about a minute."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from slidemil.config import TrainConfig
from slidemil.evaluate.report import summary_line
from slidemil.predict import predict
from slidemil.synthetic import make_feature_cohort
from slidemil.train.cv import run_cv
from slidemil.utils.io import write_csv


def run_demo(out: Path, quiet: bool = False, progress_factory=None) -> dict:
    out = Path(out)
    console = Console()
    console.print(f"[bold]slidemil demo[/] -> {out}")
    cohort_dir, external_dir, run_dir = out / "cohort", out / "external", out / "run"
    make_feature_cohort(cohort_dir, n_patients=36, seed=0)
    make_feature_cohort(external_dir, n_patients=12, seed=1)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = TrainConfig(features=str(cohort_dir / "features"), labels=str(cohort_dir / "labels.csv"),
                      out=str(run_dir), model="abmil", folds=3, epochs=15, patience=5, lr=5e-4,
                      classes=["negative", "positive"], quiet=quiet)
    if progress_factory is not None:
        with progress_factory(cfg.folds, cfg.epochs, quiet) as progress:
            run_cv(cfg, progress=progress)
    else:
        run_cv(cfg)
    from slidemil.evaluate.report import load_metrics

    metrics = load_metrics(run_dir)
    preds = predict(run_dir, external_dir / "features")
    write_csv(out / "external_predictions.csv", preds)
    console.print(f"cross-validated {summary_line(metrics)}")
    console.print(f"external cohort: {len(preds)} slides predicted -> {out / 'external_predictions.csv'}")
    console.print(f"report: {run_dir / 'report.html'}")
    return metrics
