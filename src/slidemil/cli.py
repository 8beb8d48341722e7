"""Command line: one verb per stage (DESIGN.md, "CLI"). Every verb takes --config FILE.yaml; flags win."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from slidemil.errors import SlidemilError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slidemil: weakly supervised learning on whole-slide images.")
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _setup_logging(quiet: bool, logfile: Path | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    root.addHandler(handler)
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


@contextmanager
def _errors():
    """Print a slidemil error as one clear message and exit 1; let real bugs keep their traceback."""
    try:
        yield
    except SlidemilError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None


@contextmanager
def _epoch_progress(folds: int, epochs: int, quiet: bool):
    """A rich progress bar over all epochs of all folds; yields the callback the trainer calls.
    An early-stopped or already finished fold jumps the bar to the next fold's start."""
    if quiet:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("training", total=folds * epochs)
        order: dict[int, int] = {}

        def update(row: dict):
            start = order.setdefault(row["fold"], len(order)) * epochs
            if row.get("skipped"):
                bar.update(task, completed=start + epochs, description=f"fold {row['fold']} (done before)")
                return
            bar.update(task, completed=start + row["epoch"], description=f"fold {row['fold']} epoch {row['epoch']} "
                       f"loss {row['train_loss']:.3f} val {row['val_loss']:.3f}")

        yield update


@app.command()
def train(
    features: Optional[Path] = typer.Option(None, help="Folder of per-slide feature files (h5 or CLAM pt)."),
    labels: Optional[Path] = typer.Option(None, help="Label CSV (slide_id, case_id, label)."),
    out: Optional[Path] = typer.Option(None, help="Run folder to write."),
    config: Optional[Path] = typer.Option(None, help="YAML config; flags override it."),
    model: Optional[str] = typer.Option(None, help="Aggregator name (see `slidemil models`)."),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help="Model argument KEY=VALUE (YAML value); repeatable."),
    reembed: Optional[str] = typer.Option(None, help="Re-embedding module in front of the aggregator (rrt)."),
    reembed_arg: Optional[list[str]] = typer.Option(None, "--reembed-arg", help="Re-embedding argument KEY=VALUE; repeatable."),
    strategy: Optional[str] = typer.Option(None, help="Training strategy around the model (aem, mhim, sc, histaug, feature_noise, ...)."),
    strategy_arg: Optional[list[str]] = typer.Option(None, "--strategy-arg", help="Strategy argument KEY=VALUE; repeatable."),
    folds: Optional[int] = typer.Option(None, help="Number of outer folds [5]."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs per fold [30]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [2e-4]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay [1e-4]."),
    scheduler: Optional[str] = typer.Option(None, help="cosine | plateau | none [cosine]."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience in epochs [10]."),
    monitor: Optional[str] = typer.Option(None, help="val_loss | val_auroc [val_loss]."),
    seed: Optional[int] = typer.Option(None, help="Seed for splits, initialisation and sampling [0]."),
    label_col: Optional[str] = typer.Option(None, help="Label column [label]."),
    slide_col: Optional[str] = typer.Option(None, help="Slide id column [slide_id]."),
    case_col: Optional[str] = typer.Option(None, help="Patient id column [case_id]."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class order, e.g. negative,positive."),
    site_col: Optional[str] = typer.Option(None, help="Site column, for --preserve-site."),
    preserve_site: Optional[bool] = typer.Option(None, "--preserve-site", help="Keep each site within one fold."),
    splits: Optional[Path] = typer.Option(None, help="Predefined splits.csv (slide_id, fold, role)."),
    val_fraction: Optional[float] = typer.Option(None, help="Inner validation fraction of each training fold [0.2]."),
    class_weights: Optional[str] = typer.Option(None, help="none | balanced [none]."),
    balanced_sampling: Optional[bool] = typer.Option(None, "--balanced-sampling", help="Sample bags class-balanced."),
    max_instances: Optional[int] = typer.Option(None, help="Random subset of instances per bag, training only."),
    batch_size: Optional[int] = typer.Option(None, help="Bags per step, padded with masks [1]."),
    accum_steps: Optional[int] = typer.Option(None, help="Gradient accumulation steps [1]."),
    bag_unit: Optional[str] = typer.Option(None, help="slide | patient (concatenate a patient's slides) [slide]."),
    skip_missing: Optional[bool] = typer.Option(None, "--skip-missing", help="Leave out slides without features."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda [auto]."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader worker processes [0]."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run, skipping finished folds."),
    quiet: Optional[bool] = typer.Option(None, "--quiet", help="No progress bar."),
):
    """Cross-validate a MIL model on patch features: splits, per-fold models, predictions, metrics, report."""
    import yaml

    from slidemil.config import TrainConfig, load_config
    from slidemil.evaluate.report import load_metrics, summary_line
    from slidemil.train.cv import run_cv

    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k in TrainConfig.model_fields}
    with _errors():
        for flag, items, key in (("--model-arg", model_arg, "model_args"), ("--reembed-arg", reembed_arg, "reembed_args"),
                                 ("--strategy-arg", strategy_arg, "strategy_args")):
            if items:
                args = {}
                for item in items:
                    if "=" not in item:
                        raise typer.BadParameter(f"{flag} {item!r}: expected KEY=VALUE")
                    k, value = item.split("=", 1)
                    args[k.strip()] = yaml.safe_load(value)
                overrides[key] = args
        cfg = load_config(TrainConfig, config, overrides)
        _setup_logging(cfg.quiet, Path(cfg.out) / "train.log")
        with _epoch_progress(cfg.folds, cfg.epochs, cfg.quiet) as progress:
            run = run_cv(cfg, resume=resume, progress=progress)
        out_console.print(f"{summary_line(load_metrics(run))}\nreport: {run / 'report.html'}")


@app.command()
def evaluate(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
             bootstrap: int = typer.Option(1000, help="Bootstrap resamples over patients."),
             seed: int = typer.Option(0, help="Bootstrap seed."),
             heatmaps: Optional[Path] = typer.Option(None, help="Heatmap folder for the report's gallery [RUN/heatmaps].")):
    """Recompute metrics.json, plots/ and report.html from a run's out-of-fold predictions."""
    from slidemil.evaluate.report import evaluate_run, summary_line

    _setup_logging(False)
    with _errors():
        metrics = evaluate_run(run, n_boot=bootstrap, seed=seed, heatmaps=heatmaps)
        out_console.print(f"{summary_line(metrics)}\nreport: {run / 'report.html'}")


@app.command()
def report(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
           heatmaps: Optional[Path] = typer.Option(None, help="Heatmap folder for the gallery [RUN/heatmaps]."),
           bootstrap: int = typer.Option(1000, help="Bootstrap resamples over patients.")):
    """(Re)build report.html: metrics with CIs, curves with CI bands, per-fold table, config, heatmap gallery."""
    evaluate(run, bootstrap, 0, heatmaps)


@app.command()
def heatmap(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
            slides: Path = typer.Option(..., help="Folder of the run's slides."),
            out: Optional[Path] = typer.Option(None, help="Output folder [RUN/heatmaps]."),
            slide_ids: Optional[str] = typer.Option(None, help="Comma-separated slide ids (default: all of the run)."),
            fold: str = typer.Option("all", help="all (mean of the fold models) or a fold number."),
            score: str = typer.Option("attention", help="attention | logit | class:<name>."),
            normalise: str = typer.Option("percentile", help="percentile | minmax (within each slide)."),
            sigma: float = typer.Option(0.0, help="Gaussian smoothing in heatmap pixels."),
            cmap: str = typer.Option("jet", help="Matplotlib colour map."),
            alpha: float = typer.Option(0.5, help="Overlay opacity."),
            top_k: int = typer.Option(8, help="Top and bottom tiles to show."),
            overlap: Optional[int] = typer.Option(None, help="Finer grid: overlap in px at the run's resolution; "
                                                  "features are extracted with the run's encoder."),
            mpp: Optional[float] = typer.Option(None, help="Level-0 mpp when the slides lack it.")):
    """Paint the run's instance scores onto its slides: heatmap PNG, scores h5, top tiles, QuPath GeoJSON."""
    from slidemil.explain.heatmap import HeatmapOptions, HeatmapRun

    _setup_logging(False)
    with _errors():
        opts = HeatmapOptions(fold=fold, score=score, normalise=normalise, sigma=sigma, cmap=cmap, alpha=alpha,
                              top_k=top_k, mpp=mpp, overlap=overlap)
        target = out or run / "heatmaps"
        hm = HeatmapRun(run, slides, target, opts)
        ids = [s.strip() for s in slide_ids.split(",")] if slide_ids else None
        table = hm.make_all(ids)
        done = int((table["status"] == "done").sum()) if len(table) else 0
        out_console.print(f"{done} heatmap(s) in {target}; {len(table) - done} failed"
                          + (f" (see {target / 'heatmaps.csv'})" if len(table) - done else ""))


@app.command()
def predict(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
            features: Path = typer.Option(..., help="Folder of feature files of the new cohort."),
            out: Path = typer.Option(..., help="CSV to write: one row per slide."),
            slide_ids: Optional[str] = typer.Option(None, help="Comma-separated slide ids (default: all files)."),
            skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out slides without features."),
            device: str = typer.Option("auto", help="auto | cpu | cuda.")):
    """Apply a run's fold ensemble to new features; averages the folds' probabilities."""
    from slidemil.predict import predict as run_predict
    from slidemil.utils.io import write_csv

    _setup_logging(False)
    with _errors():
        ids = [s.strip() for s in slide_ids.split(",")] if slide_ids else None
        frame = run_predict(run, features, ids, device, skip_missing)
        write_csv(out, frame)
        out_console.print(f"{len(frame)} slide(s) predicted -> {out}")


@app.command()
def models():
    """List the registered MIL aggregators with their paper, complexity and arguments."""
    from slidemil.models import available, info

    table = Table(title="slidemil models")
    table.add_column("name", no_wrap=True)
    for col in ("paper", "complexity", "summary", "arguments"):
        table.add_column(col, overflow="fold")
    for name in available():
        i = info(name)
        table.add_row(name, i.paper, i.complexity, i.summary,
                      ", ".join(f"{k}={v!r}" for k, v in i.arguments().items()))
    out_console.print(table)
    out_console.print("Every model takes in_dim (the feature dimension D) and n_outputs (number of classes).")
    from slidemil.models.reembed import REEMBEDDERS
    from slidemil.models.registry import constructor_arguments
    from slidemil.train.strategies import STRATEGIES

    extra = Table(title="training strategies (--strategy) and re-embeddings (--reembed)")
    extra.add_column("name", no_wrap=True)
    for col in ("kind", "paper", "summary", "arguments"):
        extra.add_column(col, overflow="fold")
    for name, cls in sorted(STRATEGIES.items()):
        extra.add_row(name, "strategy", cls.paper, cls.summary,
                      ", ".join(f"{k}={v!r}" for k, v in constructor_arguments(cls, ("self", "model")).items()))
    for name, cls in sorted(REEMBEDDERS.items()):
        extra.add_row(name, "re-embedding", cls.paper, cls.summary,
                      ", ".join(f"{k}={v!r}" for k, v in constructor_arguments(cls, ("self", "in_dim")).items()))
    out_console.print(extra)


@contextmanager
def _tile_progress(quiet: bool):
    """Yields `start(slide_id, n_tiles) -> callback(n_done)` driving a tiles/s bar with ETA."""
    if quiet:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, TextColumn("{task.fields[rate]}"), console=console) as bar:
        def start(slide_id: str, n: int):
            task = bar.add_task(f"extract {slide_id}", total=n, rate="")

            def advance(k: int):
                bar.update(task, advance=k)
                speed = bar.tasks[task].speed
                if speed:
                    bar.update(task, rate=f"{speed:.0f} tiles/s")

            return advance

        yield start


def _stage_command(stages: tuple[str, ...], doc: str):
    def command(
        slides: Optional[Path] = typer.Option(None, help="Folder of slides (.svs .tif .ndpi .mrxs ... .png)."),
        out: Optional[Path] = typer.Option(None, help="Output folder (segmentation/, patches/, features_<enc>/)."),
        config: Optional[Path] = typer.Option(None, help="YAML config; flags override it."),
        mpp: Optional[float] = typer.Option(None, help="Level-0 microns per pixel for slides without it."),
        mpp_csv: Optional[Path] = typer.Option(None, help="CSV of slide_id,mpp overrides."),
        backend: Optional[str] = typer.Option(None, help="auto | openslide | tifffile | image."),
        seg_mpp: Optional[float] = typer.Option(None, help="Segmentation resolution, µm/px [8]."),
        threshold: Optional[str] = typer.Option(None, help="otsu, or a saturation threshold in [0,1]."),
        min_saturation: Optional[float] = typer.Option(None, help="Lowest Otsu threshold allowed [0.04]."),
        min_area_um2: Optional[float] = typer.Option(None, help="Drop tissue objects smaller than this [20000]."),
        max_hole_um2: Optional[float] = typer.Option(None, help="Fill holes smaller than this [10000]."),
        filter_pen: Optional[bool] = typer.Option(None, "--filter-pen/--no-filter-pen", help="Remove pen ink and dark artefacts."),
        tissue_geojson: Optional[Path] = typer.Option(None, help="Folder of <slide_id>.geojson contours to use instead."),
        coords_dir: Optional[Path] = typer.Option(None, help="Extract at CLAM/TRIDENT/slidemil coordinates from this folder."),
        target_mpp: Optional[float] = typer.Option(None, help="Patch resolution in µm/px [0.5]."),
        magnification: Optional[float] = typer.Option(None, help="Patch magnification instead of mpp (20 = 0.5 µm/px)."),
        patch_size: Optional[int] = typer.Option(None, help="Patch side in px at the target resolution [256]."),
        overlap: Optional[int] = typer.Option(None, help="Overlap in px at the target resolution [0]."),
        min_tissue: Optional[float] = typer.Option(None, help="Keep patches with at least this tissue fraction [0.25]."),
        encoder: Optional[str] = typer.Option(None, help="Encoder name (see `slidemil encoders`) [handcrafted]."),
        weights: Optional[Path] = typer.Option(None, help="Encoder weights file (.safetensors .bin .pth)."),
        download: Optional[bool] = typer.Option(None, "--download", help="Fetch encoder weights from the hub (network)."),
        batch_size: Optional[int] = typer.Option(None, help="Tiles per batch [64]."),
        num_workers: Optional[int] = typer.Option(None, help="Tile-reading worker processes [0]."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
        float16: Optional[bool] = typer.Option(None, "--float16", help="Store features as float16."),
        quiet: Optional[bool] = typer.Option(None, "--quiet", help="No progress bar."),
    ):
        from slidemil.config import PreprocessConfig, load_config
        from slidemil.slides.pipeline import Pipeline, slides_in

        overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
                     if k in PreprocessConfig.model_fields}
        with _errors():
            cfg = load_config(PreprocessConfig, config, overrides)
            _setup_logging(cfg.quiet, Path(cfg.out) / "preprocess.log")
            pipe = Pipeline(cfg.options())
            with _tile_progress(cfg.quiet) as progress:
                status = pipe.run(slides_in(cfg.slides), stages, progress)
            counts = status["status"].value_counts().to_dict()
            out_console.print(f"{len(status)} slide(s): {counts.get('done', 0)} done, {counts.get('skipped', 0)} "
                              f"already complete, {counts.get('failed', 0)} failed (see {Path(cfg.out) / 'failures.csv'})")

    command.__doc__ = doc
    return command


app.command("segment")(_stage_command(("segment",), "Tissue masks: QC thumbnails and QuPath GeoJSON contours."))
app.command("patch")(_stage_command(("segment", "patch"), "Patch coordinates at a physical resolution (segments first if needed)."))
app.command("extract")(_stage_command(("segment", "patch", "extract"), "Patch features with an encoder (runs missing earlier stages)."))
app.command("preprocess")(_stage_command(("segment", "patch", "extract"), "segment + patch + extract, resumable."))


@app.command()
def encoders():
    """List the patch encoders: dimension, input size, default mpp, weight source."""
    from slidemil.features.encoders import available_encoders, get_spec
    from slidemil.features.encoders.registry import default_weights_path

    table = Table(title="slidemil encoders")
    for col in ("name", "dim", "input", "mpp", "weights", "reference"):
        table.add_column(col, overflow="fold")
    for name in available_encoders():
        s = get_spec(name)
        src = ("none needed" if not s.needs_weights else
               f"hf:{s.hub_id}{' (gated)' if s.gated else ''} -> {default_weights_path(s)}")
        table.add_row(name, str(s.dim), str(s.input_size), str(s.mpp), src, s.reference)
    out_console.print(table)
    out_console.print("Also: timm:<model name> for any timm model (weights via --weights or --download).")


@app.command()
def demo(out: Path = typer.Option(Path("demo_run"), help="Folder for the demo cohort and run."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")):
    """The whole pipeline on a built-in synthetic slide cohort: preprocess, 3-fold CV, evaluate, predict."""
    from slidemil.demo import run_demo

    _setup_logging(quiet)
    with _errors():
        run_demo(out, quiet=quiet, progress_factory=_epoch_progress)


histaug_app = typer.Typer(no_args_is_help=True, help="HistAug latent augmentation: fit a generator for an encoder.")
app.add_typer(histaug_app, name="histaug")


@histaug_app.command("fit")
def histaug_fit(slides: Path = typer.Option(..., help="Folder of slides."),
                patches: Path = typer.Option(..., help="Folder of patch coordinates (<slide_id>.h5, from `slidemil patch`)."),
                out: Path = typer.Option(..., help="Folder to write histaug.json + histaug.safetensors."),
                encoder: str = typer.Option("handcrafted", help="The encoder the MIL features come from."),
                weights: Optional[str] = typer.Option(None, help="Encoder weights file."),
                download: bool = typer.Option(False, "--download", help="Fetch the encoder weights from the hub."),
                patches_per_slide: int = typer.Option(64, help="Patches sampled per slide."),
                augmentations: int = typer.Option(4, help="Augmented views per patch."),
                epochs: int = typer.Option(50, help="Generator training epochs."),
                depth: int = typer.Option(16, help="Cross-attention blocks (the paper: 16)."),
                heldout: float = typer.Option(0.2, help="Share of slides held out to measure the generator."),
                device: str = typer.Option("auto", help="auto | cpu | cuda."),
                seed: int = typer.Option(0, help="Seed for sampling and initialisation.")):
    """Fit HistAug's generator f(z, t) ~ E(T_t(patch)) on a cohort's patches (then train with
    `--strategy histaug --strategy-arg generator=OUT`)."""
    from slidemil.augment.fit import fit_from_slides
    from slidemil.augment.histaug import FitSettings
    from slidemil.train.trainer import resolve_device

    with _errors():
        _setup_logging(False)
        settings = FitSettings(patches_per_slide=patches_per_slide, augmentations=augmentations, epochs=epochs,
                               depth=depth, heldout=heldout, seed=seed)
        report = fit_from_slides(slides, patches, out, encoder, weights, download, settings,
                                 str(resolve_device(device)))
        out_console.print(f"held-out cosine similarity (generated vs real augmented embedding): "
                          f"{report['heldout_cosine']:.3f} (unaugmented embedding: {report['identity_cosine']:.3f}) "
                          f"on {report['heldout_pairs']} pairs\ngenerator: {out}")


@app.command()
def certify(models: Optional[str] = typer.Option(None, help="Comma-separated registry names [all]."),
            tests: Optional[str] = typer.Option(None, help="single_concept,threshold_poison,false_frequency [all]."),
            seeds: int = typer.Option(2, help="Seeds per model and test."),
            model_config: Optional[Path] = typer.Option(None, help="YAML: model + model_args (or a list of them)."),
            n_train: int = typer.Option(1000, help="Training bags per test."),
            n_test: int = typer.Option(500, help="Test bags per test."),
            epochs: int = typer.Option(10, help="Training epochs."),
            min_size: Optional[int] = typer.Option(None, help="Fill bags with background up to this size."),
            standard: bool = typer.Option(False, "--standard", help="Unpoisoned sanity variants instead."),
            json_out: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON here."),
            quiet: bool = typer.Option(False, "--quiet", help="No progress lines.")):
    """Algorithmic unit tests (Raff & Holt 2023): does each model respect the standard MIL assumption?"""
    import json

    import yaml

    from slidemil.certify.run import CertifySettings, certify as run_certify
    from slidemil.errors import InputError
    from slidemil.models import available

    _setup_logging(quiet)
    with _errors():
        chosen: list[tuple[str, dict]] = []
        if model_config:
            spec = yaml.safe_load(model_config.read_text())
            for entry in spec if isinstance(spec, list) else [spec]:
                if not isinstance(entry, dict) or "model" not in entry:
                    raise InputError(f"{model_config}: each entry needs 'model' (and optional 'model_args')")
                chosen.append((entry["model"], dict(entry.get("model_args") or {})))
        names = [m.strip() for m in models.split(",")] if models else ([] if chosen else available())
        bad = [m for m in names if m not in available()] + [m for m, _ in chosen if m not in available()]
        if bad:
            raise InputError(f"unknown model(s) {', '.join(bad)}; see `slidemil models`")
        chosen += [(m, {}) for m in names]
        settings = CertifySettings(n_train=n_train, n_test=n_test, epochs=epochs, seeds=seeds, min_size=min_size,
                                   poisoned=not standard)
        test_list = [t.strip() for t in tests.split(",")] if tests else None

        def say(row):
            if not quiet:
                console.print(f"{row['model']:>14} {row['test']:>16} seed {row['seed']}: train {row['train_auroc']:.2f} "
                              f"test {row['test_auroc']:.2f} {row['verdict']} ({row['seconds']:.0f}s)")

        try:
            per_seed, summary = run_certify(chosen, test_list, settings, say)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        table = Table(title="slidemil certify (Raff & Holt 2023 algorithmic unit tests)")
        for col in ("model", "test", "train AUROC", "test AUROC", "verdict"):
            table.add_column(col)
        for r in summary.itertuples():
            table.add_row(r.model, r.test, f"{r.train_auroc:.2f} [{r.train_min:.2f}-{r.train_max:.2f}]",
                          f"{r.test_auroc:.2f} [{r.test_min:.2f}-{r.test_max:.2f}]", r.verdict)
        out_console.print(table)
        if json_out:
            from slidemil.utils.io import write_json

            write_json(json_out, {"settings": settings.__dict__, "summary": summary.to_dict("records"),
                                  "per_seed": per_seed.to_dict("records")})
            out_console.print(f"results -> {json_out}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
