"""`slidemil demo`: the whole pipeline on a synthetic slide cohort, offline, in a few minutes on 2 cores.

about 24 pyramidal TIFF slides from 16 patients (half with tumour regions) -> tissue segmentation ->
patches at 0.5 µm/px -> handcrafted features -> ABMIL with 3-fold patient-grouped CV -> metrics with
bootstrap CIs -> heatmaps of positive slides -> report.html -> fold-ensemble predictions on new slides,
validated on their labels (the report's External validation section).
`--task survival` plants a survival outcome instead (tumour patients fare worse: hazard ratio up to
e^6, uniform censoring), trains with the discrete-time NLL, and validates on the external cohort's labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from slidemil.data.synthetic import planted_outcomes
from slidemil.explain.heatmap import HeatmapRun
from slidemil.predict import predict, record_external, validate_external
from slidemil.preprocess import Pipeline, PreprocessConfig, slides_in
from slidemil.rundir import RunDir
from slidemil.slides.synthetic import make_slide_cohort
from slidemil.tasks import evaluate_run, summary_line
from slidemil.train.config import TrainConfig
from slidemil.train.cv import run_cv
from slidemil.utils.io import write_csv, write_json


def preprocess_folder(slides: Path, out: Path, quiet: bool) -> Path:
    cfg = PreprocessConfig(slides=str(slides), out=str(out), encoder="handcrafted", quiet=quiet)
    status = Pipeline(cfg).run(slides_in(slides))
    failed = status[status["status"] == "failed"]
    if len(failed):
        Console(stderr=True, markup=False).print(f"{len(failed)} slide(s) failed; see {out / 'failures.csv'}",
                                                 style="yellow")
    return out / "features_handcrafted"


def survival_labels(cohort: Path, seed: int) -> Path:
    """`labels_survival.csv` beside the cohort's labels: a planted (time, event) per patient whose
    severity is 0.6 for tumour patients plus uniform noise in [0, 0.4]."""
    path = cohort / "labels_survival.csv"
    if not path.exists():
        table = pd.read_csv(cohort / "labels.csv", dtype=str)
        patients = table.drop_duplicates("case_id")
        rng = np.random.default_rng(seed)
        severity = 0.6 * (patients["label"] == "tumour").to_numpy() + rng.uniform(0, 0.4, len(patients))
        outcome = planted_outcomes(rng, severity, "survival").assign(case_id=patients["case_id"].to_numpy())
        write_csv(path, table[["slide_id", "case_id"]].merge(outcome, on="case_id"))
    return path


def run_demo(out: Path, quiet: bool = False, progress_factory=None, n_patients: int = 16, seed: int = 0,
             slide_size: tuple[int, int] = (3072, 4096), bootstrap: int | None = None,
             task: str = "classification") -> dict:
    """The demo in `out`; `bootstrap` (resamples for the CIs) defaults to the training default."""
    out = Path(out)
    console = Console(markup=False, highlight=False)
    console.print(f"slidemil demo -> {out}")
    cohort, external = out / "cohort", out / "external"
    if not (cohort / "labels.csv").exists():
        console.print(f"writing a synthetic cohort of {n_patients} patients ...")
        make_slide_cohort(cohort, n_patients=n_patients, slides_per_patient=(1, 2), size=slide_size, seed=seed)
    if not (external / "labels.csv").exists():
        make_slide_cohort(external, n_patients=4, slides_per_patient=(1, 2), size=slide_size, seed=seed + 1)
    console.print("segment + patch + extract (handcrafted encoder) ...")
    features = preprocess_folder(cohort / "slides", cohort / "preprocessed", quiet)
    external_features = preprocess_folder(external / "slides", external / "preprocessed", quiet)
    if task == "survival":
        run = RunDir(out / "run_survival")
        labels, external_labels = survival_labels(cohort, seed), survival_labels(external, seed + 1)
        # a dozen training patients per fold: two time bins (quartiles need at least four event times)
        options = {"task": "survival", "monitor": "val_metric", "bins": 2}
    elif task == "classification":
        run = RunDir(out / "run")
        labels, external_labels = cohort / "labels.csv", external / "labels.csv"
        options = {"classes": ["normal", "tumour"]}
    else:
        raise ValueError(f"the demo runs --task classification or survival, not {task!r}")
    cfg = TrainConfig(features=str(features), labels=str(labels), out=str(run.path), model="abmil",
                      folds=3, epochs=20, patience=8, lr=1e-3, quiet=quiet, **options,
                      **({} if bootstrap is None else {"bootstrap": bootstrap}))
    resume = run.has_config()
    if progress_factory is not None:
        with progress_factory(cfg.folds, cfg.epochs, quiet) as progress:
            run_cv(cfg, resume=resume, progress=progress)
    else:
        run_cv(cfg, resume=resume)
    ranked = run.predictions()
    if task == "survival":
        ranked = ranked.sort_values("risk_pooled", ascending=False)
        console.print("heatmaps of the highest-risk slides ...")
    else:
        ranked = ranked[ranked["label"] == "tumour"].sort_values("prob_tumour", ascending=False)
        console.print("heatmaps of positive slides ...")
    HeatmapRun(run.path, cohort / "slides", run.heatmaps_dir).make_all(list(ranked["slide_id"][:4]))
    metrics = evaluate_run(run, n_boot=cfg.bootstrap, seed=cfg.seed)
    preds = predict(run.path, external_features)
    name = "external_predictions.csv" if task == "classification" else f"external_{task}/predictions.csv"
    write_csv(out / name, preds)
    console.print(f"external cohort: {len(preds)} slides predicted -> {out / name}")
    external_metrics = validate_external(run.path, preds, external_labels, n_boot=cfg.bootstrap, seed=cfg.seed)
    write_json((out / name).parent / "metrics.json", external_metrics)
    record_external(run.path, "external", external_metrics, external_labels, out / name)
    console.print(f"external validation: {summary_line(external_metrics, warnings=False)}")
    console.print(f"cross-validated {summary_line(metrics, warnings=False)}")
    n_heat = len(list(run.heatmaps_dir.glob("*_heatmap.png")))
    console.print(f"demo finished: {len(run.predictions())} slides cross-validated in {cfg.folds} folds, {n_heat} "
                  f"heatmaps, {len(preds)} external slides predicted. With {n_patients} patients the validation "
                  f"splits are small and the CIs wide: the report's caveats say so, as they would on your data.")
    console.print(f"report: {run.report_path}")
    return metrics
