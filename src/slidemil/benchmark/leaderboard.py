"""The benchmark's outputs from its finished cells: leaderboard.csv (one row per cell, cohort and
metric), comparisons.csv (each cell against the task's best cell on the same units: paired patient
bootstrap of the AUROC difference and DeLong's test, with Holm-adjusted p-values), ranking.csv/png
(average ranks over tasks with the Nemenyi critical difference), methods.md (the comparison's design and best
cells as a methods section states them) and leaderboard.html.

The AUROC of a comparison is the task's own (`classification_metrics` on the run's evaluation units, one
row per patient by default), so the leaderboard and each run's metrics.json never disagree. The reference
is the cell with the best pooled AUROC, chosen on these same predictions: that choice favours the
reference, so even Holm's p-values are optimistic about a difference from it (docs/benchmarking.md)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.evaluate.compare import average_ranks, delong, holm, nemenyi_cd, paired_bootstrap
from slidemil.evaluate.metrics import classification_metrics
from slidemil.evaluate.report import img_tag
from slidemil.rundir import RunDir
from slidemil.tasks.evaluation import run_task
from slidemil.utils.figures import new_figure, save_figure
from slidemil.utils.io import write_csv, write_text

COLUMNS = ["task", "cohort", "encoder", "model", "strategy", "seed", "metric", "value", "ci_low", "ci_high",
           "seconds", "peak_mb"]


def _rows(base: dict, cohort: str, pooled: dict) -> list[dict]:
    return [{**base, "cohort": cohort, "metric": m, **{k: v[k] for k in ("value", "ci_low", "ci_high")}}
            for m, v in pooled.items()]


def collect(out: Path, cells, results) -> pd.DataFrame:
    """Every finished cell's pooled metrics (cohort "cv"), per site ("cv:<site>") and per external cohort."""
    rows = []
    for cell, res in zip(cells, results):
        if res.get("status") != "done":
            continue
        base = {"task": cell.task, "encoder": cell.encoder, "model": cell.model, "strategy": cell.strategy or "",
                "seed": cell.seed, "seconds": res["seconds"], "peak_mb": res["peak_mb"]}
        metrics = RunDir(cell.run_dir(out)).metrics()
        rows += _rows(base, "cv", metrics["pooled"])
        for site, m in metrics.get("sites", {}).items():
            rows += _rows(base, f"cv:{site}", m["pooled"])
        for ext in sorted((cell.folder(out) / "external").glob("*/metrics.json")):
            rows += _rows(base, ext.parent.name, json.loads(ext.read_text())["pooled"])
    return pd.DataFrame(rows, columns=COLUMNS)


def _auroc(y: np.ndarray, probs: np.ndarray) -> float:
    return classification_metrics(y, probs)["auroc"]


def _paired_auroc(y: np.ndarray, pa: np.ndarray, pb: np.ndarray, groups: np.ndarray, n_boot: int) -> dict:
    return paired_bootstrap(lambda i: _auroc(y[i], pa[i]), lambda i: _auroc(y[i], pb[i]), groups, n_boot)


def _units(run: RunDir) -> pd.DataFrame:
    """The run's evaluation units (patients by default), keyed by patient and label."""
    task, _, _ = run_task(run)
    return task.units(run.predictions()).set_index(["case_id", "label"])


def compare_cells(out: Path, cells, board: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Classification tasks: every cell against the cell with the best pooled AUROC of its task, on the
    same out-of-fold units (the grid's shared splits make the predictions paired); p-values Holm-adjusted
    over the task's comparisons."""
    rows = []
    head = board[(board["cohort"] == "cv") & (board["metric"] == "auroc")]
    for task, part in head.groupby("task"):
        keyed = {(r.encoder, r.model, r.seed): r.value for r in part.itertuples()}
        task_cells = [c for c in cells if c.task == task and (c.encoder, c.model, c.seed) in keyed]
        best = max(task_cells, key=lambda c: keyed[(c.encoder, c.model, c.seed)])
        preds = {c.name: _units(RunDir(c.run_dir(out))) for c in task_cells}
        classes = RunDir(best.run_dir(out)).metrics()["classes"]
        ref = preds[best.name]
        y = ref.index.get_level_values("label").map({c: i for i, c in enumerate(classes)}).to_numpy()
        groups = ref.index.get_level_values("case_id").to_numpy()
        cols = [f"prob_{c}" for c in classes]
        pb = ref[cols].to_numpy(float)
        task_rows = []
        for c in task_cells:
            if c.name == best.name:
                continue
            pa = preds[c.name].loc[ref.index, cols].to_numpy(float)
            boot = _paired_auroc(y, pa, pb, groups, n_boot)
            dl = delong(y, pa[:, 1], pb[:, 1]) if len(classes) == 2 else {"p": float("nan")}
            task_rows.append({"task": task, "encoder": c.encoder, "model": c.model, "strategy": c.strategy or "",
                              "seed": c.seed, "vs": best.name, "metric": "auroc", "diff": boot["diff"],
                              "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "p_bootstrap": boot["p"],
                              "p_delong": dl["p"]})
        for key in ("p_bootstrap", "p_delong"):
            adjusted = holm([r[key] for r in task_rows])
            for r, p in zip(task_rows, adjusted):
                r[f"{key}_holm"] = p
        rows += task_rows
    return pd.DataFrame(rows, columns=["task", "encoder", "model", "strategy", "seed", "vs", "metric", "diff",
                                       "ci_low", "ci_high", "p_bootstrap", "p_delong", "p_bootstrap_holm",
                                       "p_delong_holm"])


def headline_rows(board: pd.DataFrame) -> pd.DataFrame:
    """Each task's rows of its headline metric (the first of its metrics: `collect` keeps the task's order)."""
    first = board.groupby("task", sort=False)["metric"].first()
    return board[board["metric"] == board["task"].map(first)]


def rank_configs(board: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Average rank over tasks of each (encoder, model) by its task's headline metric (mean over seeds),
    and the Nemenyi critical difference at alpha 0.05."""
    heads = [part.groupby(["encoder", "model"])["value"].mean().rename(task)
             for task, part in headline_rows(board[board["cohort"] == "cv"]).groupby("task")]
    if not heads:
        return pd.DataFrame(columns=["encoder", "model", "mean_rank"]), float("nan")
    table = pd.concat(heads, axis=1)
    ranks = average_ranks(table.to_numpy(float).T)
    ranking = table.reset_index().assign(mean_rank=ranks).sort_values("mean_rank").reset_index(drop=True)
    return ranking, nemenyi_cd(len(table), table.shape[1])


def plot_ranking(ranking: pd.DataFrame, cd: float, path: Path) -> Path:
    """Average ranks on one axis (1 = best, left) with the critical difference drawn above them."""
    k = len(ranking)
    fig, ax = new_figure((8, 1.2 + 0.35 * k))
    ax.scatter(ranking["mean_rank"], np.arange(k), color="#1f77b4")
    for i, r in enumerate(ranking.itertuples()):
        ax.annotate(f"{r.encoder} / {r.model}", (r.mean_rank, i), xytext=(6, -3), textcoords="offset points",
                    fontsize=8)
    if np.isfinite(cd):
        ax.plot([1, 1 + cd], [-0.8, -0.8], color="black", lw=2)
        ax.text(1, -1.1, f"CD = {cd:.2f} (Nemenyi, alpha 0.05)", fontsize=8)
    ax.set_xlim(0.5, max(k, 2) + 0.5)
    ax.set_ylim(k - 0.4, -1.6)
    ax.set_yticks([])
    ax.set_xlabel("average rank over tasks (1 = best)")
    return save_figure(fig, path, dpi=100, bbox_inches="tight")


def _table(frame: pd.DataFrame) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def methods_text(cells, board: pd.DataFrame, comparisons: pd.DataFrame, n_boot: int, cd: float) -> str:
    """`OUT/methods.md`: the comparison's design and its best cells as a methods section states them; each
    cell's own training is its run folder's methods.md."""
    done = {(c.task, c.encoder, c.model, c.seed) for c in cells} & set(
        board[["task", "encoder", "model", "seed"]].itertuples(index=False, name=None))
    listed = [c for c in cells if (c.task, c.encoder, c.model, c.seed) in done]

    def names(attr):
        return ", ".join(dict.fromkeys(str(getattr(c, attr)) for c in listed))

    text = (f"**Benchmark.** {len(listed)} cells (encoders: {names('encoder')}; models: {names('model')}; seeds: "
            f"{names('seed')}; tasks: {names('task')}) were trained on shared splits: one patient-grouped split "
            "per task, made once from the first seed, so every cell of a task was scored on the same patients "
            "(each cell's run folder holds its own methods.md).")
    if len(comparisons):
        text += (f" Each cell was compared with its task's best cell by pooled AUROC on the same evaluation units: "
                 f"the paired patient-bootstrap difference ({n_boot} resamples) with its 95% CI, and DeLong's test for "
                 "binary tasks, p-values Holm-adjusted within the task. The best cell was chosen on these same "
                 "predictions, so differences from it are optimistic.")
    if np.isfinite(cd):
        text += (f" Configurations were ranked per task by the headline metric (mean over seeds); the Nemenyi "
                 f"critical difference of the average ranks at alpha 0.05 is {cd:.2f}.")
    best = []
    for task, part in headline_rows(board[board["cohort"] == "cv"]).groupby("task", sort=False):
        top = part.sort_values("value", ascending=False, kind="stable").iloc[0]
        best.append(f"{task}: {top['encoder']} / {top['model']} (seed {top['seed']}), pooled {top['metric']} "
                    f"{top['value']:.3f} (95% CI {top['ci_low']:.3f}-{top['ci_high']:.3f})")
    if best:
        text += "\n\n**Results.** The best cell per task: " + "; ".join(best) + "."
    return text + "\n"


def write_leaderboard(out: Path, cells, results, n_boot: int, robustness: dict | None = None) -> Path:
    board = collect(out, cells, results)
    write_csv(out / "leaderboard.csv", board)
    comparisons = compare_cells(out, cells, board, n_boot)
    write_csv(out / "comparisons.csv", comparisons)
    ranking, cd = rank_configs(board)
    write_csv(out / "ranking.csv", ranking)
    write_text(out / "methods.md", methods_text(cells, board, comparisons, n_boot, cd))
    parts = ["<h1>slidemil benchmark</h1>"]
    failed = [r for r in results if r.get("status") != "done"]
    if failed:
        parts.append("<h2>Failed cells</h2>" + _table(pd.DataFrame(failed)[["cell", "error"]]))
    heads = headline_rows(board)
    for task, part in heads[heads["cohort"] == "cv"].groupby("task"):
        metric = part["metric"].iloc[0]
        view = part.sort_values("value", ascending=False)
        parts.append(f"<h2>{html.escape(task)}: pooled out-of-fold {html.escape(metric)} (95% patient-bootstrap CI)"
                     f"</h2>" + _table(view[["encoder", "model", "strategy", "seed", "value", "ci_low", "ci_high",
                                             "seconds", "peak_mb"]]))
    others = heads[heads["cohort"] != "cv"]
    if len(others):
        parts.append("<h2>Per site and external cohorts</h2>" + _table(
            others[["task", "cohort", "encoder", "model", "seed", "metric", "value", "ci_low", "ci_high"]]))
    if len(comparisons):
        parts.append("<h2>Paired comparisons with each task's best cell (same patients)</h2><p class=note>diff = "
                     "cell AUROC - best AUROC; CI and p from a paired patient bootstrap; p_delong: DeLong's test "
                     "(binary tasks).</p>" + _table(comparisons))
    if len(ranking):
        png = plot_ranking(ranking, cd, out / "ranking.png")
        parts.append(f"<h2>Average ranks over tasks</h2><p class=note>Critical difference {cd:.2f} (Nemenyi, "
                     f"alpha 0.05, {ranking.shape[1] - 3} task(s)); configurations closer than it are not "
                     f"distinguishable.</p>{img_tag(png)}" + _table(ranking))
    if robustness:
        parts.append("<h2>Robustness to centre differences</h2><p class=note>slide_ri and patch_ri are de Jong et "
                     "al.'s (2025) index R = SO / OS over the k nearest neighbours (SO: same class, other centre; "
                     "OS: other class, same centre), read against *_chance, what random embeddings score on the "
                     "same samples (1 in a balanced two-class, two-centre cohort): above it neighbourhoods follow "
                     "biology, below it the centre; slide_reading says which, or that the CI covers chance. "
                     "slide_ri_normalized is PathoROB's R / (1 + R) = SO / (SO + OS). docs/benchmarking.md.</p>"
                     + _table(pd.DataFrame(robustness["comparison"]))
                     + "".join(img_tag(out / "robustness" / r["plot"]) for r in robustness["features"].values()))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>slidemil benchmark</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
            ".note{color:#555;font-size:90%}img{max-width:100%}</style></head><body>" + "".join(parts) + "</body></html>")
    write_text(out / "leaderboard.html", page)
    return out / "leaderboard.html"
