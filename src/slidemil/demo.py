"""`slidemil demo`: the whole pipeline on a synthetic slide cohort, offline, in a few minutes on 2 cores.

about 24 pyramidal TIFF slides from 16 patients (half with tumour regions) -> tissue segmentation ->
patches at 0.5 µm/px -> handcrafted features -> ABMIL with 3-fold patient-grouped CV -> metrics with
bootstrap CIs -> heatmaps of positive slides -> report.html -> fold-ensemble predictions on new slides.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from slidemil.evaluate.report import evaluate_run, summary_line
from slidemil.explain.heatmap import HeatmapRun
from slidemil.predict import predict
from slidemil.preprocess import Pipeline, PreprocessConfig, slides_in
from slidemil.rundir import RunDir
from slidemil.slides.synthetic import make_slide_cohort
from slidemil.train.config import TrainConfig
from slidemil.train.cv import run_cv
from slidemil.utils.io import write_csv


def preprocess_folder(slides: Path, out: Path, quiet: bool) -> Path:
    cfg = PreprocessConfig(slides=str(slides), out=str(out), encoder="handcrafted", quiet=quiet)
    status = Pipeline(cfg).run(slides_in(slides))
    failed = status[status["status"] == "failed"]
    if len(failed):
        Console(stderr=True, markup=False).print(f"{len(failed)} slide(s) failed; see {out / 'failures.csv'}",
                                                 style="yellow")
    return out / "features_handcrafted"


def run_demo(out: Path, quiet: bool = False, progress_factory=None, n_patients: int = 16, seed: int = 0,
             slide_size: tuple[int, int] = (3072, 4096), bootstrap: int | None = None) -> dict:
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
    run = RunDir(out / "run")
    cfg = TrainConfig(features=str(features), labels=str(cohort / "labels.csv"), out=str(run.path), model="abmil",
                      folds=3, epochs=20, patience=8, lr=1e-3, classes=["normal", "tumour"], quiet=quiet,
                      **({} if bootstrap is None else {"bootstrap": bootstrap}))
    resume = run.has_config()
    if progress_factory is not None:
        with progress_factory(cfg.folds, cfg.epochs, quiet) as progress:
            run_cv(cfg, resume=resume, progress=progress)
    else:
        run_cv(cfg, resume=resume)
    positives = run.predictions()
    positives = positives[positives["label"] == "tumour"].sort_values("prob_tumour", ascending=False)
    console.print("heatmaps of positive slides ...")
    HeatmapRun(run.path, cohort / "slides", run.heatmaps_dir).make_all(list(positives["slide_id"][:4]))
    metrics = evaluate_run(run, n_boot=cfg.bootstrap, seed=cfg.seed)
    preds = predict(run.path, external_features)
    write_csv(out / "external_predictions.csv", preds)
    console.print(f"external cohort: {len(preds)} slides predicted -> {out / 'external_predictions.csv'}")
    console.print(f"cross-validated {summary_line(metrics)}")
    console.print(f"report: {run.report_path}")
    return metrics
