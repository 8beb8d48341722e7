"""`slidemil benchmark GRID.yaml --out DIR`: validate the grid, write each task's shared splits, run the
cells (each an ordinary run folder under `cells/<cell>/run`, in its own process, resumable), then the
leaderboard. Under torchrun, rank r runs cells r, r + W, ...; rank 0 writes the splits first and the
leaderboard last; no two ranks write the same file.

    DIR/grid.yaml            the grid as run (a rerun with another grid is refused)
    DIR/splits/<task>.csv    one split per task, shared by all its cells
    DIR/cells/<cell>/        cell.yaml, cell.log, run/ (a `slidemil train` run folder), external/<name>/,
                             cell.json (status, seconds, peak_mb; written last: a cell is done when it exists)
    DIR/robustness/          `slidemil robustness` of every encoder (when the grid asks)
    DIR/leaderboard.csv, comparisons.csv, ranking.csv, ranking.png, leaderboard.html
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from slidemil.benchmark.cell import CELL_FILE, run_cell
from slidemil.benchmark.grid import Cell, GridConfig, expand, read_grid, task_options
from slidemil.benchmark.leaderboard import write_leaderboard
from slidemil.data.cohort import Cohort
from slidemil.data.splits import make_splits
from slidemil.errors import InputError
from slidemil.robustness import read_cohorts, run_robustness
from slidemil.tasks import create_task
from slidemil.train.config import TrainConfig
from slidemil.train.cv import load_cohort
from slidemil.utils.dist import rank_world, wait_for
from slidemil.utils.io import ensure_writable, write_csv, write_json, write_text

log = logging.getLogger(__name__)


def validate(grid: GridConfig, cells: list[Cell], out: Path) -> dict[str, tuple[TrainConfig, Cohort]]:
    """Every (task, encoder) cohort with its features, every external folder, the robustness columns:
    checked before anything is written. Returns each task's first cell config (the splits' settings)
    with its cohort."""
    first: dict[str, tuple[TrainConfig, Cohort]] = {}
    seen = set()
    for cell in cells:
        if (cell.task, cell.encoder) in seen:
            continue
        seen.add((cell.task, cell.encoder))
        cfg = TrainConfig(**{**cell.config, "out": str(cell.run_dir(out))})
        cohort = load_cohort(cfg)                          # label table + this encoder's feature files
        first.setdefault(cell.task, (cfg, cohort))
    for name, ext in grid.external.items():
        if not Path(ext.labels).is_file():
            raise InputError(f"external {name}: label table {ext.labels} does not exist")
        for encoder, folder in ext.features.items():
            if not Path(folder).is_dir():
                raise InputError(f"external {name}: feature folder {folder} ({encoder}) does not exist")
    if grid.robustness is not None:
        if not grid.site_col:
            raise InputError("robustness needs site_col (the centre column) in the grid")
        read_cohorts(grid.features, grid.labels, _robustness_settings(grid))
    return first


def _robustness_settings(grid: GridConfig):
    opts = next(iter(task_options(grid).values()))
    return grid.robustness.model_copy(update={"site_col": grid.site_col,
                                              "label_col": opts.get("label_col", grid.robustness.label_col)})


def _claim_folder(grid: GridConfig, out: Path) -> None:
    """DIR/grid.yaml: written by the first run; a rerun must bring the same grid."""
    saved = out / "grid.yaml"
    text = yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=True)
    if saved.is_file():
        if saved.read_text() != text:
            raise InputError(f"{out} holds another grid's results ({saved}); rerun with that grid, or choose "
                             "another --out")
        return
    write_text(saved, text)


def write_splits(first: dict[str, tuple[TrainConfig, Cohort]], out: Path) -> None:
    """One splits.csv per task (the first seed's, grouped by patient), unless it exists (resume)."""
    for task_name, (cfg, cohort) in first.items():
        path = out / "splits" / f"{task_name}.csv"
        if path.is_file():
            continue
        task = create_task(cfg)
        splits = make_splits(cohort, cfg.folds, cfg.val_fraction, cfg.seed, cfg.preserve_site,
                             task.strata(cohort.table, cfg.folds), cfg.cv)
        task.check_splits(splits, cohort.table)
        write_csv(path, splits)


def run_cell_process(cell: Cell, grid: GridConfig, out: Path, rank: int = 0) -> dict:
    """Run one cell (in a child process unless the grid says `isolate: false`); its status, wall seconds
    and the child's own peak RSS."""
    folder, done = cell.folder(out), cell.done_path(out)
    if done.is_file() and (previous := json.loads(done.read_text())).get("status") == "done":
        return {**previous, "skipped": True}
    external = {name: {"labels": ext.labels, "features": ext.features[cell.encoder]}
                for name, ext in grid.external.items()}
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / CELL_FILE, yaml.safe_dump({"config": cell.config, "external": external}, sort_keys=False))
    start = time.perf_counter()
    if grid.isolate:
        with open(folder / "cell.log", "ab") as logfile:
            child = subprocess.Popen([sys.executable, "-m", "slidemil.benchmark.cell", str(folder)],
                                     stdout=logfile, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
        code, peak = os.waitstatus_to_exitcode(status), round(usage.ru_maxrss / 1024, 1)
    else:
        code, peak = _in_process(folder), None
    result = {"cell": cell.name, "task": cell.task, "encoder": cell.encoder, "model": cell.model,
              "strategy": cell.strategy, "seed": cell.seed, "seconds": round(time.perf_counter() - start, 2),
              "peak_mb": peak, "status": "done" if code == 0 else "failed", "rank": rank}
    if code != 0:
        tail = (folder / "cell.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        result["error"] = f"exit {code}: {tail[0][:500]}"
        log.error("cell %s failed (%s); see %s", cell.name, result["error"], folder / "cell.log")
    write_json(done, result)
    return result


def _in_process(folder: Path) -> int:
    """Run a cell in this process (grid `isolate: false`); 0, or 1 with the error in cell.log."""
    try:
        run_cell(folder)
        return 0
    except Exception as exc:       # a failing cell is recorded, the grid goes on
        with open(folder / "cell.log", "a") as fh:
            fh.write(f"{type(exc).__name__}: {exc}\n")
        return 1


def run_benchmark(grid_path: str | Path, out: str | Path, progress=None, rank: int | None = None,
                  world: int | None = None) -> dict:
    """Run (or resume) the grid; returns {"cells": [cell results], "leaderboard": path or None}."""
    grid_path, out = Path(grid_path), Path(out)
    env_rank, env_world = rank_world()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    grid = read_grid(grid_path)
    cells = expand(grid, out, grid_path)
    first = validate(grid, cells, out)
    ensure_writable(out)
    split_paths = [out / "splits" / f"{t}.csv" for t in first]
    if rank == 0:
        _claim_folder(grid, out)
        write_splits(first, out)
    else:
        wait_for(split_paths, "splits", poll=1.0)
    results = []
    for i, cell in enumerate(cells[rank::world]):
        if progress:
            progress(i, len(cells[rank::world]), cell.name)
        results.append(run_cell_process(cell, grid, out, rank))
    if rank != 0:
        return {"cells": results, "leaderboard": None}
    wait_for([c.done_path(out) for c in cells], "cells", poll=5.0)
    results = [json.loads(c.done_path(out).read_text()) for c in cells]
    robustness = None
    if grid.robustness is not None:
        robustness = run_robustness(grid.features, grid.labels, out / "robustness", _robustness_settings(grid))
    board = write_leaderboard(out, cells, results, grid.bootstrap, robustness)
    return {"cells": results, "leaderboard": board}
