"""The grid file of `slidemil benchmark` and the cells it expands to, validated before anything runs.

A cell is (task, encoder, model[+strategy], seed); its TrainConfig is the grid's `train` options, the
task's columns, the model's arguments and the task's shared `splits/<task>.csv` (made once, from the
first seed, so that every cell of a task is scored on the same patients).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slidemil.errors import InputError
from slidemil.robustness import RobustnessSettings
from slidemil.train.config import TrainConfig
from slidemil.utils.io import is_safe_id


class ModelSpec(BaseModel):
    """One model of the grid: a registry name with optional arguments and strategy; `label` names it in
    the leaderboard (default: name, or name+strategy)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    args: dict = Field(default_factory=dict)
    strategy: Optional[str] = None
    strategy_args: dict = Field(default_factory=dict)
    label: Optional[str] = None

    @property
    def key(self) -> str:
        return self.label or (f"{self.name}+{self.strategy}" if self.strategy else self.name)


class ExternalCohort(BaseModel):
    """A cohort every cell is also tested on after training: its labels and one feature folder per encoder."""

    model_config = ConfigDict(extra="forbid")

    labels: str
    features: dict[str, str]


class GridConfig(BaseModel):
    """A benchmark grid (YAML keys = field names)."""

    model_config = ConfigDict(extra="forbid")

    labels: str = Field(description="One label table for all cells.")
    task: str = Field("classification", description="The task when `tasks` is not given.")
    tasks: dict[str, dict] = Field(default_factory=dict, description="name -> task options (task, label_col, "
                                                                     "time_col, ...): several tasks of one table.")
    features: dict[str, str] = Field(min_length=1, description="encoder name -> feature folder.")
    models: list[Union[str, ModelSpec]] = Field(min_length=1, description="Model names, or {name, args, strategy, "
                                                                         "label}.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="Training seeds (the splits use the first).")
    folds: int = Field(5, ge=2, description="Outer folds (kfold).")
    cv: Literal["kfold", "leave-site-out"] = Field("kfold", description="kfold | leave-site-out (needs site_col).")
    site_col: Optional[str] = Field(None, description="Centre column: per-site metrics, leave-site-out, robustness.")
    train: dict = Field(default_factory=dict, description="Any `slidemil train` option for every cell.")
    external: dict[str, ExternalCohort] = Field(default_factory=dict, description="name -> external test cohort.")
    robustness: Optional[RobustnessSettings] = Field(None, description="Run `slidemil robustness` on every "
                                                                       "encoder (needs site_col).")
    bootstrap: int = Field(1000, ge=0, description="Patient-bootstrap resamples (CIs and paired comparisons).")
    isolate: bool = Field(True, description="Run each cell in its own process (its own peak memory; a crash "
                                            "fails only the cell). false: in this process, faster for small "
                                            "grids, peak memory not measured.")

    @field_validator("models")
    @classmethod
    def _specs(cls, models):
        specs = [ModelSpec(name=m) if isinstance(m, str) else m for m in models]
        keys = [s.key for s in specs]
        bad = [k for k in keys if not is_safe_id(k.replace("+", "-"))]
        if bad:
            raise ValueError(f"model labels {', '.join(bad)} cannot name folders (letters, digits, ., _, -, +)")
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"models {', '.join(dup)} appear twice; give each a distinct `label`")
        return specs

    @field_validator("features", "tasks")
    @classmethod
    def _names(cls, value):
        bad = [k for k in value if not is_safe_id(k) or "__" in k]
        if bad:
            raise ValueError(f"names {', '.join(bad)} cannot name folders (letters, digits, - and _ only; no '__')")
        return value


RUN_DIR = "run"           # the cell's `slidemil train` run folder
DONE_FILE = "cell.json"   # status, seconds, peak_mb; written last: a cell is done when it says so


class Cell(BaseModel):
    task: str
    encoder: str
    model: str
    strategy: Optional[str]
    seed: int
    config: dict

    @property
    def name(self) -> str:
        return f"{self.task}__{self.encoder}__{self.model.replace('+', '-')}__s{self.seed}"

    # the cell's folder under the grid's --out: cell.yaml, cell.log, RUN_DIR/, external/<name>/, DONE_FILE
    def folder(self, out: Path) -> Path:
        return out / "cells" / self.name

    def run_dir(self, out: Path) -> Path:
        return self.folder(out) / RUN_DIR

    def done_path(self, out: Path) -> Path:
        return self.folder(out) / DONE_FILE


def read_grid(path: str | Path) -> GridConfig:
    """The grid file, with relative paths taken from its folder; one-line errors naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot be read as YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of grid keys (labels, features, models, ...)")
    try:
        grid = GridConfig(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"{path}: {'.'.join(map(str, err['loc'])) or 'grid'}: {err['msg']}") from None
    base = path.parent

    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() else base / p)

    grid.labels = resolve(grid.labels)
    grid.features = {k: resolve(v) for k, v in grid.features.items()}
    for ext in grid.external.values():
        ext.labels = resolve(ext.labels)
        ext.features = {k: resolve(v) for k, v in ext.features.items()}
    return grid


def task_options(grid: GridConfig) -> dict[str, dict]:
    """name -> task fields of TrainConfig (one task named after itself when `tasks` is not given)."""
    return grid.tasks or {grid.task: {"task": grid.task}}


def expand(grid: GridConfig, out: Path, path: Path | None = None) -> list[Cell]:
    """Every cell, its TrainConfig validated (model names and arguments, options, task fields)."""
    where = path or "grid"
    reserved = {"features", "labels", "out", "seed", "splits", "model", "model_args", "strategy", "strategy_args"}
    clash = sorted(reserved & set(grid.train))
    if clash:
        raise InputError(f"{where}: train: {', '.join(clash)} are set by the grid itself; use the grid's keys")
    for name, ext in grid.external.items():
        missing = sorted(set(grid.features) - set(ext.features))
        if missing:
            raise InputError(f"{where}: external {name}: no feature folder for encoder(s) {', '.join(missing)}")
    cells = []
    for task, options in task_options(grid).items():
        for encoder, folder in grid.features.items():
            for spec in grid.models:
                for seed in grid.seeds:
                    cfg = {**grid.train, **options, "features": folder, "labels": grid.labels, "seed": seed,
                           "folds": grid.folds, "cv": grid.cv, "site_col": grid.site_col, "quiet": True,
                           "bootstrap": grid.bootstrap, "model": spec.name, "model_args": spec.args,
                           "strategy": spec.strategy, "strategy_args": spec.strategy_args,
                           "splits": str(out / "splits" / f"{task}.csv")}
                    cell = Cell(task=task, encoder=encoder, model=spec.key, strategy=spec.strategy, seed=seed,
                                config=cfg)
                    try:
                        TrainConfig(**{**cfg, "out": str(cell.run_dir(out))})
                    except ValidationError as exc:
                        err = exc.errors()[0]
                        raise InputError(f"{where}: cell {cell.name}: {'.'.join(map(str, err['loc'])) or 'train'}: "
                                         f"{err['msg']}") from None
                    cells.append(cell)
    return cells
