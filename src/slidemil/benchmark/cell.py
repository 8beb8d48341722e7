"""One cell of a benchmark grid, run in its own process (`python -m slidemil.benchmark.cell CELL_DIR`)
so that its wall time and peak memory are its own and a crash fails the cell, not the grid: the
cross-validation run (resumed where it stopped), then each external cohort's predictions and metrics."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml

from slidemil.benchmark.grid import RUN_DIR
from slidemil.predict import predict, validate_external
from slidemil.rundir import RunDir
from slidemil.train.config import TrainConfig
from slidemil.train.cv import run_cv
from slidemil.utils.io import write_csv, write_json

CELL_FILE = "cell.yaml"          # what the grid asks of the cell: {config, external}


def run_cell(cell_dir: Path) -> None:
    spec = yaml.safe_load((cell_dir / CELL_FILE).read_text())
    run = cell_dir / RUN_DIR
    cfg = TrainConfig(**{**spec["config"], "out": str(run)})
    handlers = []
    try:
        # the cell is this rank's piece of a torchrun grid: its run is trained here alone
        run_cv(cfg, resume=RunDir(run).has_config(), on_start=lambda r: handlers.append(_log_to(r.log_path)),
               ranks=(0, 1))
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
    for name, ext in spec.get("external", {}).items():
        folder = cell_dir / "external" / name
        if (folder / "metrics.json").is_file():
            continue
        preds = predict(run, ext["features"], device=cfg.device, labels=ext["labels"])
        metrics = validate_external(run, preds, ext["labels"], n_boot=cfg.bootstrap, seed=cfg.seed)
        write_csv(folder / "predictions.csv", preds)
        write_json(folder / "metrics.json", metrics)


def _log_to(path: Path) -> logging.Handler:
    """The run's train.log, as `slidemil train` writes it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run_cell(Path(sys.argv[1]))
