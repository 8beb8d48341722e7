"""`slidemil evaluate`: a run's pooled and per-fold metrics with patient-bootstrap CIs (metrics.json),
its plots and report.html, all by the run's task."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from slidemil.errors import InputError
from slidemil.evaluate.report import unit_note, write_report
from slidemil.rundir import RunDir
from slidemil.tasks.base import Task, create_task, own_options
from slidemil.tasks.methods import methods_markdown, methods_sections
from slidemil.utils.io import read_csv_text, write_json, write_text


def run_task(run: RunDir, options: dict | None = None) -> tuple[Task, dict, dict]:
    """(task, config.yaml, what the metrics need from it) of a finished run, `options` overriding its task
    options (e.g. eval_unit); runs from before tasks existed are classification, and runs from before
    --eval-unit are scored as they were (per slide, survival and regression per patient)."""
    if not run.predictions_path.is_file() or not run.config_path.is_file():
        raise InputError(f"{run.path} is not a finished run folder (needs predictions.csv and config.yaml)")
    cfg = run.config()
    if "eval_unit" not in cfg and cfg.get("task", "classification") in ("classification", "ordinal"):
        cfg["eval_unit"] = "slide"
    cfg.update(options or {})
    task = create_task(cfg, source=run.config_path)
    classes = (cfg.get("slidemil") or {}).get("classes")
    if classes is None:
        raise InputError(f"{run.config_path}: its `slidemil` block (classes, provenance) is missing; restore the file "
                         f"that `slidemil train` wrote")
    meta = {"classes": [str(c) for c in classes], "loss": cfg.get("survival_loss")}
    return task, cfg, meta


BASELINE_RESAMPLES = 200


def evaluate_run(run: str | Path | RunDir, n_boot: int = 1000, seed: int = 0,
                 heatmaps: str | Path | None = None, options: dict | None = None) -> dict:
    """Pooled out-of-fold metrics with patient-bootstrap CIs, per-fold metrics, plots and the report."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    task, cfg, meta = run_task(run, options)
    preds = run.predictions()
    missing = [c for c in task.prediction_columns(meta) if c not in preds.columns]
    if missing:
        raise InputError(f"{run.predictions_path}: columns {', '.join(missing)} are missing")
    splits = read_csv_text(run.splits_path, dtype={"slide_id": str, "case_id": str}) if run.splits_path.is_file() else None
    metrics = task.evaluate(preds, splits, meta, n_boot, seed)
    baseline = run.baseline_predictions()
    if baseline is not None:   # a reference: its CIs take at most BASELINE_RESAMPLES resamples
        scored = task.evaluate(baseline, splits, meta, min(n_boot, BASELINE_RESAMPLES), seed)
        metrics["baseline"] = {"name": task.baseline_name, "pooled": scored["pooled"],
                               "fold_summary": scored["fold_summary"], "resamples": scored["bootstrap"]["resamples"]}
    if "site" in preds.columns:
        metrics["sites"] = site_metrics(task, preds, meta, metrics, n_boot, seed)
    metrics["warnings"] = run_warnings(run, metrics, task)
    render_report(run, metrics, heatmaps, options)      # its plots add what they measure (survival: the KM log-rank)
    write_json(run.metrics_path, metrics)
    return metrics


def render_report(run: RunDir, metrics: dict | None = None, heatmaps: str | Path | None = None,
                  options: dict | None = None) -> Path:
    """report.html (and plots/) from a run's metrics (default: its metrics.json), its heatmaps and the
    external validations recorded in it; computes no metric, so `predict --labels` can refresh it."""
    task, cfg, meta = run_task(run, options)
    metrics = run.metrics() if metrics is None else metrics
    preds = run.predictions()
    plots = task.plots(preds, metrics, run.plots_dir)
    gallery = task.gallery(_per_slide(run, preds) if cfg.get("bag_unit") == "patient" else preds, meta,
                           Path(heatmaps) if heatmaps else run.heatmaps_dir)
    methods = methods_sections(run, cfg, metrics, task)
    write_text(run.methods_path, methods_markdown(methods))
    return write_report(run, own_options(cfg), metrics, plots, gallery,
                        task.report_notes(metrics) + protocol_notes(metrics, task) + defaults_note(run)
                        + tuning_notes(run) + site_notes(metrics), external_notes(run, task), methods)


def _per_slide(run: RunDir, preds: pd.DataFrame) -> pd.DataFrame:
    """A patient-bag run's predictions (one row per patient) repeated for each of the patient's test slides,
    so that the gallery captions every slide's heatmap with its patient's label and prediction."""
    test = run.test_rows()
    if test.empty or "case_id" not in test:
        return preds
    slides = test[["slide_id", "case_id"]].drop_duplicates("slide_id")
    return slides.merge(preds.drop(columns="slide_id"), on="case_id", how="inner")


def site_metrics(task: Task, preds: pd.DataFrame, meta: dict, metrics: dict, n_boot: int, seed: int) -> dict:
    """{site: {n_slides, n_patients, metrics with patient-bootstrap CIs}} of the out-of-fold predictions
    split by the label table's site (--site-col): where a model trained elsewhere works and where not.
    A site where a metric is undefined (one class, no event) reports NaN for it."""
    shared = {k: metrics[k] for k in ("eval_times", "tau", "ibs_window") if metrics.get(k) is not None}   # survival
    out = {}
    for site, part in preds.groupby("site", sort=True):
        part = part.drop(columns="fold", errors="ignore").reset_index(drop=True)
        scored = task.evaluate(part, None, {**meta, **shared}, n_boot, seed)
        out[str(site)] = {"n_slides": scored["n_slides"], "n_patients": scored["n_patients"],
                          "pooled": scored["pooled"]}
    return out


def site_notes(metrics: dict, title: str = "Per site") -> str:
    """The report's per-site table (HTML), when the run knows each slide's site."""
    sites = metrics.get("sites")
    if not sites:
        return ""
    names = list(next(iter(sites.values()))["pooled"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{m['n_patients']}</td>"
        + "".join(f"<td>{_num(m['pooled'][n]['value'])} ({_num(m['pooled'][n]['ci_low'])}-"
                  f"{_num(m['pooled'][n]['ci_high'])})</td>" for n in names) + "</tr>"
        for site, m in sites.items())
    return (f"<h3>{html.escape(title)} (95% patient-bootstrap CIs)</h3><table><tr><th>site</th><th>patients</th>{head}</tr>"
            f"{rows}</table>")


def external_notes(run: RunDir, task: Task) -> str:
    """The report's External validation section (HTML): every cohort `slidemil predict --labels` scored with
    this run's fold ensemble, with its metrics, CIs, caveats and per-site table."""
    parts = []
    for name, ext in run.externals().items():
        m = ext["metrics"]
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td><b>{_num(v['value'])}</b></td>"
                       f"<td>{_num(v['ci_low'])} – {_num(v['ci_high'])}</td></tr>" for k, v in m["pooled"].items())
        caveats = "".join(f"<p class=note><b>Caveat:</b> {html.escape(w)}</p>" for w in m.get("warnings", []))
        parts.append(
            f"<h3>{html.escape(name)}</h3><p class=note>{m['n_patients']} patients, {m['n_slides']} slides of "
            f"{html.escape(str(ext['labels']))}, scored on {html.escape(str(ext['date']))} by the mean of the run's "
            f"{ext['folds']} fold models (nothing of this cohort was used in training or selection; predictions: "
            f"{html.escape(str(ext['predictions']))}). {html.escape(unit_note(m))}</p>"
            f"<table><tr><th>metric</th><th>value</th><th>95% CI (patient bootstrap, "
            f"{m['bootstrap']['resamples']} resamples)</th></tr>{rows}</table>{caveats}"
            + site_notes(m, f"{name}: per site"))
    if not parts:
        return ""
    return ("<h2>External validation</h2><p class=note>Cohorts the run never saw, scored with `slidemil predict "
            "--labels`; a rerun on the same cohort name replaces its entry.</p>" + "".join(parts))


def defaults_note(run: RunDir) -> str:
    """The per-model defaults (or paper recipe) the run took without being asked (HTML)."""
    folds = run.finished_folds()
    meta = run.fold_meta(folds[0]) if folds else {}
    applied = meta.get("applied_defaults")
    if not applied:
        return ""
    what = "the paper recipe" if meta.get("recipe") == "paper" else "slidemil's measured per-model defaults"
    text = ", ".join(f"{k} = {v}" for k, v in applied.items())
    return (f"<p class=note>Settings applied from {what} for {html.escape(str(meta.get('model')))} (not given on the "
            f"command line; docs/protocol.md): {html.escape(text)}.</p>")


def tuning_notes(run: RunDir) -> str:
    """What `--tune` chose in each fold (HTML), and why its validation scores are not the result."""
    rows = []
    for fold in run.finished_folds():
        tuned = run.fold_meta(fold).get("tuned")
        if tuned:
            chosen = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in tuned["settings"].items())
            rows.append(f"<tr><td>{fold}</td><td>{html.escape(chosen)}</td><td>{tuned['trials']}</td>"
                        f"<td>{_num(tuned['validation'])}</td></tr>")
    if not rows:
        return ""
    return ("<h3>Tuning (--tune)</h3><p class=note>Each fold searched its settings (Optuna TPE) on its inner "
            "validation split only; the test fold took no part, so the metrics above stay out-of-sample. The "
            "validation column is the best of several trials on the same bags and therefore optimistic.</p>"
            "<table><tr><th>fold</th><th>chosen</th><th>trials</th><th>validation</th></tr>" + "".join(rows)
            + "</table>")


SMALL_COHORT = 20     # patients below which a CI is too unstable to quote without a caveat


def sample_caveats(metrics: dict, task: Task) -> list[str]:
    """Caveats a reader needs beside the headline: too few patients for a stable CI, a CI that collapsed to
    one value (every resample scored the same), a headline that is undefined on this sample."""
    head = task.metric_names[0]
    m = metrics["pooled"][head]
    n = metrics["n_patients"]
    out = []
    if n < SMALL_COHORT:
        out.append(f"only {n} patients: the 95% CI of {head} is wide and itself unstable at this size; treat the "
                   f"value as anecdotal, not as an estimate of performance")
    value, low, high = m["value"], m["ci_low"], m["ci_high"]
    if value == value and low == high == value:
        out.append(f"the bootstrap CI of {head} collapsed to {value:.3f}: every resample of these {n} patients "
                   f"scored the same, which says nothing about precision")
    if value != value:
        reason = next((v for k, v in (metrics.get("nan_reasons") or {}).items() if k == f"pooled {head}"),
                      "the sample cannot support it (e.g. one class only)")
        out.append(f"{head} is undefined here: {reason}")
    return out


def run_warnings(run: RunDir, metrics: dict, task: Task) -> list[str]:
    """What the folds warned about (small validation splits), small-sample caveats, and a model that trails
    its baseline."""
    warnings = sample_caveats(metrics, task)
    excluded = run.excluded()
    if len(excluded):
        first = excluded.iloc[0]
        warnings.append(f"{len(excluded)} slide(s) of the label table were left out of training and evaluation "
                        f"(e.g. {first['slide_id']}: {first['reason']}); excluded.csv lists each with its reason")
    for fold in run.finished_folds():
        warnings += run.fold_meta(fold).get("warnings", [])
    warnings += pooled_below_folds(metrics, task)
    head = task.metric_names[0]
    ours, ref = metrics["pooled"][head]["value"], metrics.get("baseline", {}).get("pooled", {}).get(head, {}).get("value")
    if ref is not None and ours is not None and ours < ref - 0.02:
        warnings.append(f"the model's pooled {head} {ours:.3f} is below the reference baseline's {ref:.3f} on the "
                        f"same folds ({task.baseline_name}); a signal spread over many instances (a phenotype "
                        f"shift, a tumour region) favours averaging over attention that picks a few: --model "
                        f"mean_pool or abmilx held on every cohort family docs/protocol.md measured, which also "
                        f"lists what else to try (--tune, --standardize whiten)")
    return warnings


POOLING_GAP = 0.1     # pooled headline this far below the folds' mean: the fold models' scores differ in scale


def pooled_below_folds(metrics: dict, task: Task) -> list[str]:
    """The pooled headline well below the mean of the folds' (0.80 pooled against 0.99 per fold on a run whose
    folds each ranked their patients almost perfectly): each fold model ranks its own test patients, but
    their scores sit on different scales, so one threshold or ranking across folds does worse. Papers that
    report the fold mean would quote the higher number; the reader should know why the two differ."""
    head = task.metric_names[0]
    pooled, folds = metrics["pooled"][head]["value"], (metrics.get("fold_summary") or {}).get(head, {}).get("mean")
    if pooled is None or folds is None or not folds - pooled > POOLING_GAP:
        return []
    return [f"the pooled {head} {pooled:.3f} is {folds - pooled:.2f} below the mean of the folds' {folds:.3f}: each fold "
            f"model ranks its own test patients, but the folds' scores sit on different scales (see the per-fold "
            f"table; a fold whose predictions all fall on one side of the threshold ranks without classifying), so "
            f"they do worse pooled. The pooled value is what one of these models would face on new patients; train "
            f"longer (--epochs) or check the calibration plot, and quote both if you compare with papers that report "
            f"the fold mean"]


def protocol_notes(metrics: dict, task: Task) -> str:
    """The report's baseline line and warnings (HTML)."""
    parts = []
    base = metrics.get("baseline")
    if base:
        head = task.metric_names[0]
        m = base["pooled"][head]
        parts.append(f"<p class=note>Reference baseline, same folds: {html.escape(base['name'])}: {head} "
                     f"{_num(m['value'])} (95% CI {_num(m['ci_low'])}-{_num(m['ci_high'])}).</p>")
    parts += [f"<p class=note><b>Warning:</b> {html.escape(w)}</p>" for w in metrics.get("warnings", [])]
    return "".join(parts)


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def summary_line(metrics: dict, warnings: bool = True) -> str:
    """The headline metric of a metrics.json with its CI, e.g. "AUROC 0.912 (95% CI 0.85-0.96)", then the
    reference baseline's and the warnings (or, with warnings=False, how many the report lists)."""
    task = create_task({"task": metrics.get("task", "classification")})
    line = task.summary(metrics)
    if metrics.get("baseline"):
        line += f"; baseline ({task.baseline_name.split(' (')[0]}) " + task.summary(metrics["baseline"])
    notes = metrics.get("warnings", [])
    if not warnings:
        return line + (f" ({len(notes)} caveat(s) in the report)" if notes else "")
    return "\n".join([line, *(f"warning: {w}" for w in notes)])
