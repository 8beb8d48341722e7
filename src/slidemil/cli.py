"""Command line: one verb per stage. Every verb takes --config FILE.yaml; flags win. Each flag's help and
default come from the stage's settings model (`TrainConfig`, `PreprocessConfig`)."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from slidemil.augment.histaug import FitSettings
from slidemil.certify.run import CertifySettings
from slidemil.errors import InputError, SlidemilError, disk_full
from slidemil.explain.heatmap import HeatmapOptions
from slidemil.explain.viewer import ViewerOptions
from slidemil.features.extract import ExtractConfig
from slidemil.preprocess import PreprocessConfig
from slidemil.robustness import RobustnessSettings
from slidemil.train.config import TrainConfig
from slidemil.utils.config import field_help, load_config
from slidemil.utils.dist import rank_world
from slidemil.utils.io import ensure_writable
from slidemil.utils.text import printable

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slidemil: weakly supervised learning on whole-slide images.")
# Neither console interprets rich markup in what it prints: slide ids, paths and labels are user text
# ("bad[/]id" is a valid file name). Styling goes through Text objects.
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
out_console = Console(soft_wrap=True, markup=False, highlight=False)


_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show the traceback behind an input error.")):
    """slidemil: weakly supervised learning on whole-slide images."""
    _state["debug"] = debug


class _PrintableRecords(logging.Filter):
    """Log messages carry user text too: control characters are shown, not executed."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(record.getMessage()), None
        return True


QUIET = typer.Option(False, "--quiet", help="Warnings and errors only (no progress or info lines).")


def _setup_logging(quiet: bool, logfile: Path | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.addFilter(_PrintableRecords())
    root.addHandler(handler)
    if logfile is not None:
        _add_logfile(logfile)


def _add_logfile(path: Path) -> None:
    """Also log to `path` (created only when the run or stage has validated its inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(fh)


@contextmanager
def _errors():
    """Print a slidemil error as one clear message and exit 1; let real bugs keep their traceback."""
    try:
        yield
    except SlidemilError as exc:
        if _state["debug"]:
            console.print_exception()
        console.print(Text.assemble(("error: ", "bold red"), printable(exc)))
        raise typer.Exit(1) from None
    except Exception as exc:
        if not disk_full(exc):
            raise
        if _state["debug"]:
            console.print_exception()
        where = getattr(exc, "filename", None)
        console.print(Text.assemble(("error: ", "bold red"), printable(
            f"no space left on the device{f' writing {where}' if where else ''}: free space (or choose another "
            f"--out), then run the same command again; finished outputs are kept and skipped (train: --resume), "
            f"and nothing half-written was kept")))
        raise typer.Exit(1) from None


def _ids(text: str | None) -> list[str] | None:
    """A --slide-ids value as a list (None: every slide)."""
    return [s.strip() for s in text.split(",")] if text else None


def _per_slide_summary(table, noun: str, where: Path, listing: Path, allow: bool) -> None:
    """The closing line of a per-slide batch (heatmap, view, embed-slides) and its exit status: rows with
    status failed are counted, the rest are done (or kept from an earlier run)."""
    failed = int((table["status"] == "failed").sum()) if len(table) else 0
    out_console.print(f"{len(table) - failed} {noun}(s) in {where}; {failed} failed"
                      + (f" (see {listing})" if failed else ""))
    _exit_for_failures(failed, len(table), allow)


def _exit_for_failures(failed: int, total: int, allow: bool) -> None:
    """A batch where every item failed exits 1; one where some failed exits 1 unless --allow-failures."""
    if failed and (failed == total or not allow):
        why = "every item failed" if failed == total else f"{failed} of {total} failed (--allow-failures exits 0)"
        console.print(Text.assemble(("error: ", "bold red"), why))
        raise typer.Exit(1)


@contextmanager
def _epoch_progress(folds: int, epochs: int, quiet: bool):
    """A rich progress bar over all epochs of all folds; yields the callback the trainer calls.
    An early-stopped or already finished fold jumps the bar to the next fold's start."""
    if quiet:
        yield None
        return
    if not console.is_terminal:     # a log file or a pipe: a line per 5 epochs and per finished fold, never silence
        def line(row: dict):
            if row.get("skipped"):
                console.print(f"fold {row['fold']}: done before, skipped")
            elif row["epoch"] % 5 == 0 or row["epoch"] in (1, epochs):
                console.print(f"fold {row['fold']} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f} "
                              f"val {row['val_loss']:.3f} ({row.get('seconds', 0):.1f} s/epoch)")

        yield line
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
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


def _given(cls, values: dict) -> dict:
    """The CLI arguments that are fields of the settings model `cls` (paths as strings), for load_config."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k in cls.model_fields}


def _opt(cls, name: str, *decls: str):
    """A flag whose help and default come from the settings field `name` of `cls` (one place per default).
    The flag's own default is None: an unset flag leaves the YAML value or the field default."""
    return typer.Option(None, *decls, help=field_help(cls, name), show_default=False)


def _setting(cls, name: str, value):
    """A flag's value checked against the settings field it comes from (its default when unset), for verbs
    that use it without building the settings: `evaluate --bootstrap -1` ran, as if 0."""
    from pydantic import TypeAdapter, ValidationError

    if value is None:
        return cls.model_fields[name].default
    field = cls.model_fields[name]
    try:
        return TypeAdapter(Annotated[(field.annotation, *field.metadata)]).validate_python(value)
    except ValidationError as exc:
        raise InputError(f"--{name.replace('_', '-')} {value}: {exc.errors()[0]['msg']}") from None


@app.command()
def train(
    features: Optional[Path] = _opt(TrainConfig, "features"),
    labels: Optional[Path] = _opt(TrainConfig, "labels"),
    out: Optional[Path] = _opt(TrainConfig, "out"),
    config: Optional[Path] = typer.Option(None, help="YAML config; flags override it."),
    model: Optional[str] = _opt(TrainConfig, "model"),
    model_arg: Optional[list[str]] = _opt(TrainConfig, "model_args", "--model-arg"),
    reembed: Optional[str] = _opt(TrainConfig, "reembed"),
    reembed_arg: Optional[list[str]] = _opt(TrainConfig, "reembed_args", "--reembed-arg"),
    strategy: Optional[str] = _opt(TrainConfig, "strategy"),
    strategy_arg: Optional[list[str]] = _opt(TrainConfig, "strategy_args", "--strategy-arg"),
    folds: Optional[int] = _opt(TrainConfig, "folds"),
    recipe: Optional[str] = _opt(TrainConfig, "recipe"),
    epochs: Optional[int] = _opt(TrainConfig, "epochs"),
    lr: Optional[float] = _opt(TrainConfig, "lr"),
    weight_decay: Optional[float] = _opt(TrainConfig, "weight_decay"),
    scheduler: Optional[str] = _opt(TrainConfig, "scheduler"),
    patience: Optional[int] = _opt(TrainConfig, "patience"),
    min_epochs: Optional[int] = _opt(TrainConfig, "min_epochs"),
    smooth: Optional[int] = _opt(TrainConfig, "smooth"),
    select: Optional[str] = _opt(TrainConfig, "select"),
    standardize: Optional[str] = _opt(TrainConfig, "standardize"),
    monitor: Optional[str] = _opt(TrainConfig, "monitor"),
    seed: Optional[int] = _opt(TrainConfig, "seed"),
    task: Optional[str] = _opt(TrainConfig, "task"),
    label_col: Optional[str] = _opt(TrainConfig, "label_col"),
    time_col: Optional[str] = _opt(TrainConfig, "time_col"),
    event_col: Optional[str] = _opt(TrainConfig, "event_col"),
    target_col: Optional[str] = _opt(TrainConfig, "target_col"),
    survival_loss: Optional[str] = _opt(TrainConfig, "survival_loss"),
    bins: Optional[int] = _opt(TrainConfig, "bins"),
    alpha_surv: Optional[float] = _opt(TrainConfig, "alpha_surv"),
    eval_times: Optional[str] = _opt(TrainConfig, "eval_times"),
    ibs_range: Optional[str] = _opt(TrainConfig, "ibs_range"),
    eval_unit: Optional[str] = _opt(TrainConfig, "eval_unit"),
    regression_loss: Optional[str] = _opt(TrainConfig, "regression_loss"),
    slide_col: Optional[str] = _opt(TrainConfig, "slide_col"),
    case_col: Optional[str] = _opt(TrainConfig, "case_col"),
    classes: Optional[str] = _opt(TrainConfig, "classes"),
    site_col: Optional[str] = _opt(TrainConfig, "site_col"),
    preserve_site: Optional[bool] = _opt(TrainConfig, "preserve_site", "--preserve-site"),
    cv: Optional[str] = _opt(TrainConfig, "cv"),
    splits: Optional[Path] = _opt(TrainConfig, "splits"),
    val_fraction: Optional[float] = _opt(TrainConfig, "val_fraction"),
    class_weights: Optional[str] = _opt(TrainConfig, "class_weights"),
    balanced_sampling: Optional[bool] = _opt(TrainConfig, "balanced_sampling", "--balanced-sampling/--no-balanced-sampling"),
    tune: Optional[bool] = _opt(TrainConfig, "tune", "--tune"),
    tune_trials: Optional[int] = _opt(TrainConfig, "tune_trials"),
    max_instances: Optional[int] = _opt(TrainConfig, "max_instances"),
    instance_dropout: Optional[float] = _opt(TrainConfig, "instance_dropout"),
    pack_len: Optional[int] = _opt(TrainConfig, "pack_len"),
    batch_size: Optional[int] = _opt(TrainConfig, "batch_size"),
    accum_steps: Optional[int] = _opt(TrainConfig, "accum_steps"),
    bag_unit: Optional[str] = _opt(TrainConfig, "bag_unit"),
    skip_missing: Optional[bool] = _opt(TrainConfig, "skip_missing", "--skip-missing"),
    skip_bad: Optional[bool] = _opt(TrainConfig, "skip_bad", "--skip-bad"),
    bootstrap: Optional[int] = _opt(TrainConfig, "bootstrap"),
    device: Optional[str] = _opt(TrainConfig, "device"),
    ddp: Optional[str] = _opt(TrainConfig, "ddp"),
    num_workers: Optional[int] = _opt(TrainConfig, "num_workers"),
    max_instances_infer: Optional[int] = _opt(TrainConfig, "max_instances_infer"),
    compile: Optional[bool] = _opt(TrainConfig, "compile", "--compile"),
    cache_gb: Optional[float] = _opt(TrainConfig, "cache_gb"),
    cache_device: Optional[str] = _opt(TrainConfig, "cache_device"),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run, skipping finished folds."),
    quiet: Optional[bool] = _opt(TrainConfig, "quiet", "--quiet"),
):
    """Cross-validate a MIL model on patch features: splits, per-fold models, predictions, metrics, report."""
    import yaml

    from slidemil.rundir import RunDir
    from slidemil.tasks import summary_line
    from slidemil.train.cv import run_cv

    overrides = _given(TrainConfig, locals())
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
        run = RunDir(cfg.out)
        _setup_logging(cfg.quiet)
        leader = rank_world()[0] == 0          # under torchrun, rank 0 shows progress and the result
        with _epoch_progress(cfg.folds, cfg.epochs, cfg.quiet or not leader) as progress:
            run_cv(cfg, resume=resume, progress=progress, on_start=lambda r: _add_logfile(r.log_path))
        if leader:
            out_console.print(f"{summary_line(run.metrics())}\nreport: {run.report_path}")


@app.command()
def evaluate(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
             bootstrap: Optional[int] = _opt(TrainConfig, "bootstrap"),
             seed: int = typer.Option(0, min=0, max=2**31 - 1, help="Bootstrap seed."),
             heatmaps: Optional[Path] = typer.Option(None, help="Heatmap folder for the report's gallery "
                                                     "(default: RUN/heatmaps)."),
             eval_unit: Optional[str] = _opt(TrainConfig, "eval_unit"),
             ibs_range: Optional[str] = _opt(TrainConfig, "ibs_range"),
             quiet: bool = QUIET):
    """Recompute metrics.json, plots/ and report.html from a run's out-of-fold predictions (--eval-unit and
    --ibs-range override the run's)."""
    from slidemil.rundir import RunDir
    from slidemil.tasks import evaluate_run, summary_line

    _setup_logging(quiet)
    with _errors():
        n_boot = _setting(TrainConfig, "bootstrap", bootstrap)
        options = {k: v for k, v in (("eval_unit", eval_unit), ("ibs_range", ibs_range)) if v is not None}
        metrics = evaluate_run(run, n_boot=n_boot, seed=seed, heatmaps=heatmaps, options=options)
        out_console.print(f"{summary_line(metrics)}\nreport: {RunDir(run).report_path}")


@app.command()
def report(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
           heatmaps: Optional[Path] = typer.Option(None, help="Heatmap folder for the gallery (default: RUN/heatmaps)."),
           bootstrap: Optional[int] = _opt(TrainConfig, "bootstrap")):
    """(Re)build report.html: metrics with CIs, curves with CI bands, per-fold table, config, heatmap gallery."""
    evaluate(run, bootstrap, 0, heatmaps, None, None)


@app.command()
def heatmap(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
            slides: Path = typer.Option(..., help="Folder of the run's slides (subfolders searched too)."),
            out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN/heatmaps; another cohort's "
                                               "slides: RUN/external/<slide folder>_heatmaps)."),
            features: Optional[Path] = typer.Option(None, help="The run's feature folder, where it is now "
                                                    "(default: where the run was trained on it)."),
            slide_ids: Optional[str] = typer.Option(None, help="Comma-separated slide ids (default: all of the run)."),
            fold: Optional[str] = _opt(HeatmapOptions, "fold"),
            score: Optional[str] = _opt(HeatmapOptions, "score"),
            normalise: Optional[str] = _opt(HeatmapOptions, "normalise"),
            sigma: Optional[float] = _opt(HeatmapOptions, "sigma"),
            cmap: Optional[str] = _opt(HeatmapOptions, "cmap"),
            alpha: Optional[float] = _opt(HeatmapOptions, "alpha"),
            top_k: Optional[int] = _opt(HeatmapOptions, "top_k"),
            overlap: Optional[int] = _opt(HeatmapOptions, "overlap"),
            mpp: Optional[float] = _opt(HeatmapOptions, "mpp"),
            allow_failures: Optional[bool] = _opt(HeatmapOptions, "allow_failures", "--allow-failures"),
            quiet: bool = QUIET):
    """Paint the run's instance scores onto its slides: heatmap PNG, scores h5, top tiles, QuPath GeoJSON."""
    from slidemil.explain.heatmap import HeatmapRun

    given = _given(HeatmapOptions, locals())
    _setup_logging(quiet)
    with _errors():
        opts = load_config(HeatmapOptions, None, given)
        hm = HeatmapRun(run, slides, out, opts, features)
        ids = hm.check(_ids(slide_ids))
        ensure_writable(hm.out)
        table = hm.make_all(ids)
        _per_slide_summary(table, "heatmap", hm.out, hm.out / "heatmaps.csv", opts.allow_failures)


@app.command()
def view(run: Path = typer.Argument(..., help="Run folder written by `slidemil train` (with `slidemil heatmap` done)."),
         slides: Path = typer.Option(..., help="Folder of the run's slides (subfolders searched too)."),
         heatmaps: Optional[Path] = typer.Option(None, help="Heatmap folder (default: RUN/heatmaps, or another "
                                                 "cohort's RUN/external/<slide folder>_heatmaps)."),
         out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN/viewer)."),
         slide_ids: Optional[str] = typer.Option(None, help="Comma-separated slide ids (default: every heatmap)."),
         max_mpp: Optional[float] = _opt(ViewerOptions, "max_mpp"),
         tile_size: Optional[int] = _opt(ViewerOptions, "tile_size"),
         quality: Optional[int] = _opt(ViewerOptions, "quality"),
         cmap: Optional[str] = _opt(ViewerOptions, "cmap"),
         alpha: Optional[float] = _opt(ViewerOptions, "alpha"),
         top_k: Optional[int] = _opt(ViewerOptions, "top_k"),
         mpp: Optional[float] = _opt(ViewerOptions, "mpp"),
         allow_failures: Optional[bool] = _opt(ViewerOptions, "allow_failures", "--allow-failures"),
         quiet: bool = QUIET):
    """A static zoomable page (Deep Zoom tiles, heatmap overlay, top tiles) of the run's heatmapped slides:
    open RUN/viewer/index.html from disk, no server needed."""
    from slidemil.explain.viewer import SlideViewer, default_folders
    from slidemil.rundir import RunDir

    given = _given(ViewerOptions, locals())
    _setup_logging(quiet)
    with _errors():
        opts = load_config(ViewerOptions, None, given)
        rd = RunDir(run)
        rd.config()                                   # a run folder, or one line saying it is not
        painted, shown = default_folders(rd, slides)
        target = out or shown
        viewer = SlideViewer(slides, heatmaps or painted, target, opts)
        ensure_writable(target)
        table = viewer.make_all(_ids(slide_ids), title=f"slidemil viewer: {rd.name}")
        _per_slide_summary(table, "slide", target / "index.html", target / "viewer.csv", opts.allow_failures)


@app.command()
def predict(run: Path = typer.Argument(..., help="Run folder written by `slidemil train`."),
            features: Path = typer.Option(..., help="Folder of feature files of the new cohort."),
            out: Path = typer.Option(..., help="CSV to write: one row per slide (per patient for a run trained "
                                     "with --bag-unit patient)."),
            slide_ids: Optional[str] = typer.Option(None, help="Comma-separated slide ids (default: all files)."),
            skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out slides without features."),
            labels: Optional[Path] = typer.Option(None, help="Label table of this cohort (the run's columns): also "
                                                  "write its metrics with CIs to metrics.json beside --out; a run "
                                                  "trained on patient bags needs it to group the slides."),
            bootstrap: Optional[int] = _opt(TrainConfig, "bootstrap"),
            max_instances_infer: Optional[int] = _opt(TrainConfig, "max_instances_infer"),
            device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
            name: Optional[str] = typer.Option(None, help="Name of this cohort in the run report's External "
                                               "validation section (default: the folder of --labels)."),
            force: bool = typer.Option(False, "--force", help="Write --out even inside a run folder or over an input."),
            quiet: bool = QUIET):
    """Apply a run's fold ensemble to new features (the run's task decides the columns); with --labels,
    validate it on this cohort."""
    from slidemil.predict import check_output, external_name, record_external, validate_external
    from slidemil.predict import predict as run_predict
    from slidemil.tasks import summary_line
    from slidemil.utils.io import atomic_path, json_text

    _setup_logging(quiet)
    with _errors():
        ids = _ids(slide_ids)
        n_boot = _setting(TrainConfig, "bootstrap", bootstrap)
        max_instances_infer = _setting(TrainConfig, "max_instances_infer", max_instances_infer)
        if labels is not None and not labels.is_file():
            raise InputError(f"--labels {labels} does not exist")
        check_output(out, run, {"--labels": labels, "--features": features}, force)
        cohort_name = external_name(labels, name) if labels is not None else None
        ensure_writable(out.parent, create=False)   # made only once the inputs are known good
        frame = run_predict(run, features, ids, device, skip_missing, max_instances_infer, labels)
        metrics = None
        if labels is not None:
            metrics = validate_external(run, frame, labels, n_boot=n_boot)
        # both files under temporary names first, renamed together: a full disk leaves neither, not one alone
        with ExitStack() as both:
            tmp_csv = both.enter_context(atomic_path(out))
            if metrics is not None:
                both.enter_context(atomic_path(out.parent / "metrics.json")).write_text(json_text(metrics), "utf-8")
            frame.to_csv(tmp_csv, index=False)
        out_console.print(f"{len(frame)} {'slide' if 'slide_id' in frame else 'patient'}(s) predicted -> {out}")
        if metrics is not None:
            record_external(run, cohort_name, metrics, labels, out)
            out_console.print(f"external validation: {summary_line(metrics)} -> {out.parent / 'metrics.json'}\n"
                              f"report: {run / 'report.html'} (External validation: {cohort_name})")


@app.command()
def models():
    """List the registered MIL aggregators, training strategies and re-embeddings with their arguments."""
    from slidemil.models.reembed import REEMBEDDINGS
    from slidemil.models.registry import MODELS
    from slidemil.train.strategies import STRATEGIES

    def args(entry) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in entry.arguments().items())

    rows = [(e.name, e.paper, e.complexity, "yes" if e.cls.packable else "", e.summary, args(e)) for e in MODELS]
    extra_rows = [(e.name, registry.kind, e.paper, e.summary, args(e))
                  for registry in (STRATEGIES, REEMBEDDINGS) for e in registry]
    note = ("Every model takes in_dim (the feature dimension D) and n_outputs (number of classes). "
            "'packs': trains with --pack-len (pooling kept inside each bag of a pack).")
    if not out_console.is_terminal:     # piped: one tab-separated line per entry, never a word cut in two
        for head, body in ((("name", "paper", "complexity", "packs", "summary", "arguments"), rows),
                           (("name", "kind", "paper", "summary", "arguments"), extra_rows)):
            print("\t".join(head))
            for row in body:
                print("\t".join(row))
            print()
        print(note)
        return
    table = Table(title="slidemil models")
    table.add_column("name", no_wrap=True)
    for col in ("paper", "complexity", "packs", "summary", "arguments"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out_console.print(table)
    out_console.print(note)
    extra = Table(title="training strategies (--strategy) and re-embeddings (--reembed)")
    extra.add_column("name", no_wrap=True)
    for col in ("kind", "paper", "summary", "arguments"):
        extra.add_column(col, overflow="fold")
    for row in extra_rows:
        extra.add_row(*row)
    out_console.print(extra)


@contextmanager
def _tile_progress(quiet: bool):
    """Yields `start(slide_id, n_tiles) -> callback(n_done)` driving a tiles/s bar with ETA."""
    if quiet:
        yield None
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, TextColumn("{task.fields[rate]}", markup=False), console=console) as bar:
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
    P = PreprocessConfig

    def command(
        slides: Optional[Path] = _opt(P, "slides"),
        out: Optional[Path] = _opt(P, "out"),
        config: Optional[Path] = typer.Option(None, help="YAML config; flags override it."),
        mpp: Optional[float] = _opt(P, "mpp"),
        mpp_csv: Optional[Path] = _opt(P, "mpp_csv"),
        backend: Optional[str] = _opt(P, "backend"),
        seg_mpp: Optional[float] = _opt(P, "seg_mpp"),
        threshold: Optional[str] = _opt(P, "threshold"),
        min_saturation: Optional[float] = _opt(P, "min_saturation"),
        median: Optional[int] = _opt(P, "median"),
        close: Optional[int] = _opt(P, "close"),
        min_area_um2: Optional[float] = _opt(P, "min_area_um2"),
        max_hole_um2: Optional[float] = _opt(P, "max_hole_um2"),
        filter_pen: Optional[bool] = _opt(P, "filter_pen", "--filter-pen/--no-filter-pen"),
        allow_failures: Optional[bool] = _opt(P, "allow_failures", "--allow-failures"),
        tissue_geojson: Optional[Path] = _opt(P, "tissue_geojson"),
        coords_dir: Optional[Path] = _opt(P, "coords_dir"),
        target_mpp: Optional[float] = _opt(P, "target_mpp"),
        magnification: Optional[float] = _opt(P, "magnification"),
        patch_size: Optional[int] = _opt(P, "patch_size"),
        overlap: Optional[int] = _opt(P, "overlap"),
        min_tissue: Optional[float] = _opt(P, "min_tissue"),
        encoder: Optional[str] = _opt(P, "encoder"),
        weights: Optional[Path] = _opt(P, "weights"),
        download: Optional[bool] = _opt(P, "download", "--download"),
        batch_size: Optional[int] = _opt(P, "batch_size"),
        num_workers: Optional[int] = _opt(P, "num_workers"),
        device: Optional[str] = _opt(P, "device"),
        float16: Optional[bool] = _opt(P, "float16", "--float16"),
        stain_norm: Optional[str] = _opt(P, "stain_norm"),
        stain_target: Optional[Path] = _opt(P, "stain_target"),
        quiet: Optional[bool] = _opt(P, "quiet", "--quiet"),
    ):
        from slidemil.preprocess import Pipeline, slides_in

        overrides = _given(PreprocessConfig, locals())
        with _errors():
            cfg = load_config(PreprocessConfig, config, overrides)
            slide_paths = slides_in(cfg.slides)
            pipe = Pipeline(cfg)
            pipe.check(stages)          # what concerns the whole batch, before --out is made
            ensure_writable(cfg.out)
            _setup_logging(cfg.quiet, Path(cfg.out) / "preprocess.log")
            with _tile_progress(cfg.quiet) as progress:
                status = pipe.run(slide_paths, stages, progress)
            counts = status["status"].value_counts().to_dict()
            busy = f", {counts['busy']} in progress in another process" if counts.get("busy") else ""
            out_console.print(f"{len(status)} slide(s): {counts.get('done', 0)} done, {counts.get('skipped', 0)} "
                              f"already complete{busy}, {counts.get('failed', 0)} failed "
                              f"(see {Path(cfg.out) / 'failures.csv'})")
            _exit_for_failures(counts.get("failed", 0), len(status), cfg.allow_failures)

    command.__doc__ = doc
    return command


app.command("segment")(_stage_command(("segment",), "Tissue masks: QC thumbnails and QuPath GeoJSON contours."))
app.command("patch")(_stage_command(("segment", "patch"),
                                    "Patch coordinates at a physical resolution (segments first if needed)."))
app.command("extract")(_stage_command(("segment", "patch", "extract"),
                                      "Patch features with an encoder (runs missing earlier stages)."))
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
        where = f"hf:{s.hub_id}" if s.hub_id else s.extra.get("url", "by hand")
        src = ("none needed" if not s.needs_weights else
               f"{where}{' (gated)' if s.gated else ''} -> {default_weights_path(s)}")
        table.add_row(name, str(s.dim), str(s.input_size), str(s.mpp), src, s.reference)
    out_console.print(table)
    out_console.print("Also: timm:<model name> for any timm model (weights via --weights or --download).")
    from slidemil.features.slide_encoders import SLIDE_ENCODERS, available_slide_encoders

    slides = Table(title="slide encoders (slidemil embed-slides)")
    for col in ("name", "patch features", "dim", "weights", "reference"):
        slides.add_column(col, overflow="fold")
    for name in available_slide_encoders():
        s = SLIDE_ENCODERS.info(name).obj
        src = "none needed" if not s.needs_weights else f"{s.extra.get('url', '')} -> {default_weights_path(s)}"
        slides.add_row(name, f"{s.patch_encoder or 'any'} ({s.in_dim or 'any'}-d)", str(s.dim or "= patch"), src,
                       s.reference)
    out_console.print(slides)


@app.command("embed-slides")
def embed_slides(features: Path = typer.Option(..., help="Folder of patch feature files (one .h5 or .pt per slide)."),
                 out: Path = typer.Option(..., help="Folder for the slide embeddings (one [1, D] .h5 per slide)."),
                 encoder: str = typer.Option("mean", help="Slide encoder (see `slidemil encoders`)."),
                 weights: Optional[Path] = typer.Option(None, help="The slide encoder's weights file (default: "
                                                        "$SLIDEMIL_WEIGHTS/<encoder>/<file>)."),
                 slide_ids: Optional[str] = typer.Option(None, help="Comma-separated slide ids (default: all files)."),
                 device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
                 allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 when some slides failed "
                                                     "(never when all did)."),
                 quiet: bool = QUIET):
    """One embedding per slide from its patch features. The output folder is a feature folder: `slidemil
    train --features OUT` trains on it, and the run's baseline is the linear (Cox) probe of the embedding."""
    from slidemil.features.slide_encoders import embed_slides as run_embed
    from slidemil.utils.device import resolve_device

    _setup_logging(quiet)
    with _errors():
        table = run_embed(features, out, encoder, str(weights) if weights else None, _ids(slide_ids),
                          str(resolve_device(device)))
        _per_slide_summary(table, "slide embedding", out, out / "embed_slides.csv", allow_failures)


@app.command()
def demo(out: Path = typer.Option(Path("demo_run"), help="Folder for the demo cohort and run."),
         task: str = typer.Option("classification", help="classification | survival (a planted outcome)."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")):
    """The whole pipeline on a built-in synthetic slide cohort: preprocess, 3-fold CV, evaluate, predict."""
    from slidemil.demo import run_demo

    _setup_logging(quiet)
    with _errors():
        if task not in ("classification", "survival"):
            raise InputError(f"--task {task}: the demo runs classification or survival")
        run_demo(out, quiet=quiet, progress_factory=_epoch_progress, task=task)


@app.command()
def doctor(out: Path = typer.Option(Path("."), help="The folder outputs will go to (its disk is checked)."),
           hash_files: bool = typer.Option(False, "--hash", help="sha256 of every weights file found (slow for GB "
                                                                 "files).")):
    """Is this machine ready? OpenSlide, GPU, disk, optional extras and every encoder's weights, with fixes."""
    from slidemil.doctor import run_checks

    checks = run_checks(out, hash_files)
    for c in checks:
        mark = "ok" if c.ok else ("FAIL" if c.required else "--")
        out_console.print(f"{mark:>4}  {c.name}: {c.detail}" + (f"\n      fix: {c.fix}" if not c.ok and c.fix else ""))
    failed = [c.name for c in checks if c.required and not c.ok]
    if failed:
        out_console.print(f"not ready: {', '.join(failed)}")
        raise typer.Exit(1)
    out_console.print("ready (items marked -- are optional)")


weights_app = typer.Typer(no_args_is_help=True, help="Encoder weights: where they go, and fetching them.")
app.add_typer(weights_app, name="weights")


@weights_app.command("fetch")
def weights_fetch(name: str = typer.Argument(..., help="Encoder name (see `slidemil encoders`).")):
    """Download an encoder's weights file from the hub to its default location (network; gated models need
    access granted on their page and HF_TOKEN)."""
    from slidemil.features.encoders.weights import fetch

    with _errors():
        out_console.print(f"{name}: {fetch(name)}")


histaug_app = typer.Typer(no_args_is_help=True, help="HistAug latent augmentation: fit a generator for an encoder.")
app.add_typer(histaug_app, name="histaug")


@histaug_app.command("fit")
def histaug_fit(slides: Path = typer.Option(..., help="Folder of slides."),
                patches: Path = typer.Option(..., help="Folder of patch coordinates (<slide_id>.h5, from `slidemil patch`)."),
                out: Path = typer.Option(..., help="Folder to write histaug.json + histaug.safetensors."),
                encoder: Optional[str] = _opt(ExtractConfig, "encoder"),
                weights: Optional[str] = _opt(ExtractConfig, "weights"),
                download: bool = typer.Option(False, "--download", help="Fetch the encoder weights from the hub."),
                patches_per_slide: Optional[int] = _opt(FitSettings, "patches_per_slide"),
                augmentations: Optional[int] = _opt(FitSettings, "augmentations"),
                epochs: Optional[int] = _opt(FitSettings, "epochs"),
                depth: Optional[int] = _opt(FitSettings, "depth"),
                heldout: Optional[float] = _opt(FitSettings, "heldout"),
                device: Optional[str] = _opt(ExtractConfig, "device"),
                seed: Optional[int] = _opt(FitSettings, "seed"),
                quiet: bool = QUIET):
    """Fit HistAug's generator f(z, t) ~ E(T_t(patch)) on a cohort's patches (then train with
    `--strategy histaug --strategy-arg generator=OUT`)."""
    from slidemil.augment.fit import fit_from_slides
    from slidemil.utils.device import resolve_device

    given = _given(FitSettings, locals())
    with _errors():
        _setup_logging(quiet)
        settings = load_config(FitSettings, None, given)
        enc = load_config(ExtractConfig, None, {"encoder": encoder, "weights": weights, "device": device})
        report = fit_from_slides(slides, patches, out, enc.encoder, enc.weights, download, settings,
                                 str(resolve_device(enc.device)))
        out_console.print(f"held-out cosine similarity (generated vs real augmented embedding): "
                          f"{report['heldout_cosine']:.3f} (unaugmented embedding: {report['identity_cosine']:.3f}) "
                          f"on {report['heldout_pairs']} pairs\ngenerator: {out}")


@app.command()
def certify(models: Optional[str] = typer.Option(None, help="Comma-separated registry names (default: all)."),
            tests: Optional[str] = typer.Option(None, help="single_concept,threshold_poison,false_frequency (default: all)."),
            seeds: Optional[int] = _opt(CertifySettings, "seeds"),
            model_config: Optional[Path] = typer.Option(None, help="YAML: model + model_args (or a list of them)."),
            n_train: Optional[int] = _opt(CertifySettings, "n_train"),
            n_test: Optional[int] = _opt(CertifySettings, "n_test"),
            epochs: Optional[int] = _opt(CertifySettings, "epochs"),
            min_size: Optional[int] = _opt(CertifySettings, "min_size"),
            device: Optional[str] = _opt(CertifySettings, "device"),
            standard: bool = typer.Option(False, "--standard", help="Unpoisoned sanity variants instead."),
            json_out: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON here."),
            task: str = typer.Option("classification", help="Only classification: the tests are binary MIL "
                                     "assumptions."),
            quiet: bool = typer.Option(False, "--quiet", help="No progress lines.")):
    """Algorithmic unit tests (Raff & Holt 2023): does each model respect the standard MIL assumption?"""
    import yaml

    from slidemil.certify.run import certify as run_certify
    from slidemil.models import available

    if task != "classification":
        with _errors():
            raise InputError(f"certify checks binary classification MIL assumptions (Raff & Holt 2023); they are not defined "
                             f"for --task {task}. Certify a model as a classifier; its survival/regression head is "
                             "the same aggregator")
    given = _given(CertifySettings, locals())
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
        settings = load_config(CertifySettings, None, {**given, "poisoned": not standard})
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

            write_json(json_out, {"settings": settings.model_dump(), "summary": summary.to_dict("records"),
                                  "per_seed": per_seed.to_dict("records")})
            out_console.print(f"results -> {json_out}")


@app.command()
def benchmark(grid: Path = typer.Argument(..., help="Grid YAML: labels, features {encoder: folder}, models, seeds, "
                                          "folds, train {...}; see docs/benchmarking.md."),
              out: Path = typer.Option(..., help="Folder of the grid's cells, splits and leaderboard."),
              allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 when some cells failed "
                                                  "(never when all did)."),
              quiet: bool = QUIET):
    """Run a grid of encoders x models x tasks x seeds on shared patient-grouped splits (resumable cell by cell;
    one cell per rank under torchrun), then the leaderboard with paired comparisons."""
    from slidemil.benchmark.run import run_benchmark

    _setup_logging(quiet)
    with _errors():
        def say(i, n, name):
            console.print(f"cell {i + 1}/{n}: {name}")

        result = run_benchmark(grid, out, progress=say)
        failed = sum(r.get("status") != "done" for r in result["cells"])
        if result["leaderboard"]:
            out_console.print(f"{len(result['cells'])} cell(s), {failed} failed; leaderboard: {result['leaderboard']}")
        _exit_for_failures(failed, len(result["cells"]), allow_failures)


def _named_folders(items: list[str], flag: str) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (named by its folder) per item; names must be distinct."""
    named: dict[str, Path] = {}
    for item in items:
        name, _, folder = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        if name in named:
            raise InputError(f"{flag} {item}: the name {name!r} is given twice; use NAME=DIR to tell them apart")
        named[name] = Path(folder)
    return named


@app.command()
def robustness(features: list[str] = typer.Option(..., help="Feature folder, as DIR or NAME=DIR; repeat to compare "
                                                  "encoders, or features before and after stain normalisation."),
               labels: Path = typer.Option(..., help="Label table with the label and centre columns."),
               out: Path = typer.Option(..., help="Folder for robustness.json and the plots."),
               label_col: Optional[str] = _opt(RobustnessSettings, "label_col"),
               site_col: Optional[str] = _opt(RobustnessSettings, "site_col"),
               slide_col: Optional[str] = _opt(RobustnessSettings, "slide_col"),
               case_col: Optional[str] = _opt(RobustnessSettings, "case_col"),
               k_slide: Optional[int] = _opt(RobustnessSettings, "k_slide"),
               k_patch: Optional[int] = _opt(RobustnessSettings, "k_patch"),
               patches_per_slide: Optional[int] = _opt(RobustnessSettings, "patches_per_slide"),
               map: Optional[str] = _opt(RobustnessSettings, "map"),
               bootstrap: Optional[int] = _opt(RobustnessSettings, "bootstrap"),
               balance: Optional[bool] = _opt(RobustnessSettings, "balance", "--balance/--no-balance"),
               draws: Optional[int] = _opt(RobustnessSettings, "draws"),
               seed: Optional[int] = _opt(RobustnessSettings, "seed"),
               quiet: bool = QUIET):
    """Do the embeddings cluster by centre or by biology? Robustness index (de Jong et al. 2025), label and
    centre probes, a 2-D map."""
    from slidemil.robustness import run_robustness

    given = _given(RobustnessSettings, locals())
    _setup_logging(quiet)
    with _errors():
        settings = load_config(RobustnessSettings, None, given)
        folders = _named_folders(features, "--features")
        report = run_robustness(folders, labels, out, settings)
        table = Table(title="robustness to centre differences (de Jong et al.: R = SO / OS; above the level of "
                            "random embeddings, biology dominates)")
        for col in ("features", "slide R [95% CI]", "random embeddings", "reading", "patch R (random)", "centre probe",
                    "label probe"):
            table.add_column(col)
        for r in report["comparison"]:
            table.add_row(r["features"], f"{r['slide_ri']:.3f} [{r['slide_ri_ci_low']:.3f}-{r['slide_ri_ci_high']:.3f}]",
                          f"{r['slide_ri_chance']:.2f}", r["slide_reading"],
                          f"{r['patch_ri']:.3f} ({r['patch_ri_chance']:.2f})",
                          f"{r['centre_probe_bacc']:.2f} (chance {r['centre_chance']:.2f})",
                          f"{r['label_probe_bacc']:.2f} (chance {r['label_chance']:.2f})")
        out_console.print(table)
        out_console.print(f"results -> {out / 'robustness.json'}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
