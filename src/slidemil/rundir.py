"""`RunDir`: the one place that knows the layout of a run folder written by `slidemil train`.

```
config.yaml            resolved config + provenance (slidemil block)
splits.csv             slide_id, case_id, fold, role
fold_<k>/              model.safetensors, model.json, history.csv, predictions.csv, done.json (written last)
excluded.csv           labelled slides the run left out (no label value, features missing or unusable with
                       --skip-missing / --skip-bad, not in a given --splits), with the reason
predictions.csv        pooled out-of-fold predictions
metrics.json, plots/, report.html, attention/<slide_id>.h5, heatmaps/, train.log
external/<name>.json   one per external cohort `slidemil predict --labels` validated the run on (the report's
                       External validation section)
viewer/                `slidemil view`: a static deep-zoom page of slides with their heatmaps
```
Every stage that reads or writes a run (train, evaluate, predict, heatmap, report, strategies that
start from an earlier run, the demo) goes through this class.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import yaml

from slidemil.errors import InputError
from slidemil.models.checkpoint import load_model
from slidemil.utils.config import read_yaml_mapping
from slidemil.utils.io import read_csv_text, safe_child, write_csv, write_json, write_text
from slidemil.utils.lock import Lock

log = logging.getLogger(__name__)


def _child(name: str) -> property:
    """A path inside the run folder, as a read-only attribute."""
    return property(lambda self: self.path / name, doc=f"`{name}` in the run folder")


class RunDir:
    """Paths and readers/writers of one run folder; `path` need not exist yet."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths --------------------------------------------------------------------------------------
    config_path = _child("config.yaml")
    splits_path = _child("splits.csv")
    predictions_path = _child("predictions.csv")
    baseline_path = _child("baseline_predictions.csv")   # the reference baseline's out-of-fold predictions
    excluded_path = _child("excluded.csv")
    metrics_path = _child("metrics.json")
    report_path = _child("report.html")
    methods_path = _child("methods.md")    # the methods and results paragraphs, written from what the run recorded
    plots_dir = _child("plots")
    attention_dir = _child("attention")
    heatmaps_dir = _child("heatmaps")
    external_dir = _child("external")
    viewer_dir = _child("viewer")
    log_path = _child("train.log")
    launch_path = _child(".launch")   # torchrun's run id, written by rank 0 once config and splits are in place

    @property
    def name(self) -> str:
        return self.path.name

    def external_cohort_dir(self, cohort: str, what: str) -> Path:
        """external/<cohort>_<what> (heatmaps, viewer) of another cohort's slides, kept apart from heatmaps/ and
        viewer/ (the cross-validated slides, the report's gallery)."""
        return safe_child(self.external_dir, re.sub(r"[^A-Za-z0-9._ -]", "_", cohort).strip(" .") or "cohort",
                          f"_{what}")

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{int(fold)}"

    def lock(self) -> Lock:
        """The run's advisory lock: one process writes a run folder at a time."""
        return Lock(self.path / ".slidemil.lock", f"run folder {self.path}")

    # -- state --------------------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.config_path.exists()

    def clean_temporaries(self) -> None:
        """Remove half-written files (`.<name>.tmp-<pid>`) that a killed process left; call under `lock()`."""
        for tmp in self.path.rglob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)

    def is_fold_done(self, fold: int) -> bool:
        return (self.fold_dir(fold) / "done.json").exists()

    def mark_fold_done(self, fold: int, info: dict) -> None:
        """Written last in a fold, after its weights, history, predictions and attention files."""
        write_json(self.fold_dir(fold) / "done.json", info)

    def finished_folds(self) -> list[int]:
        """Folds whose done.json exists, in order; an error when there is none."""
        folds = sorted(int(p.name.split("_")[1]) for p in self.path.glob("fold_*")
                       if p.name.split("_")[1].isdigit() and (p / "done.json").exists())
        if not folds:
            raise InputError(f"{self.path} has no finished fold (fold_<k>/done.json); train it first")
        return folds

    # -- config -------------------------------------------------------------------------------------
    def config(self) -> dict:
        """config.yaml as written (with its `slidemil` provenance block); an edited file that is no longer a
        mapping of settings is one InputError naming it."""
        if not self.config_path.is_file():
            raise InputError(f"{self.path} is not a run folder (no config.yaml)")
        data = read_yaml_mapping(self.config_path, empty_ok=False)
        if not isinstance(data.get("slidemil", {}), dict):
            raise InputError(f"{self.config_path}: its `slidemil` block must be a mapping; restore the file that "
                             f"`slidemil train` wrote")
        return data

    def write_config(self, config: dict) -> None:
        write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    # -- tables -------------------------------------------------------------------------------------
    def write_splits(self, splits: pd.DataFrame) -> None:
        write_csv(self.splits_path, splits)

    def write_excluded(self, excluded: dict[str, str]) -> None:
        """excluded.csv: the slides of the label table the run left out, and why."""
        if excluded:
            write_csv(self.excluded_path, pd.DataFrame({"slide_id": list(excluded), "reason": list(excluded.values())}))

    def excluded(self) -> pd.DataFrame:
        """excluded.csv (slide_id, reason); empty when nothing was left out."""
        if not self.excluded_path.is_file():
            return pd.DataFrame({"slide_id": [], "reason": []})
        return read_csv_text(self.excluded_path, dtype={"slide_id": str, "reason": str})

    def test_rows(self) -> pd.DataFrame:
        """The splits.csv rows of the slides each fold reported on (slide_id, fold, and case_id where the file has
        it); empty without one."""
        if not self.splits_path.is_file():
            return pd.DataFrame({"slide_id": [], "case_id": [], "fold": []})
        df = read_csv_text(self.splits_path, dtype={"slide_id": str, "case_id": str})
        return df[df["role"] == "test"].drop(columns="role").reset_index(drop=True)

    def test_folds(self) -> dict[str, int]:
        """{slide_id: the fold that tested it}."""
        test = self.test_rows()
        return dict(zip(test["slide_id"], test["fold"].astype(int)))

    def test_ids(self, fold: int) -> set[str]:
        """The slides that fold `fold` reported on (never trained or validated on)."""
        test = self.test_rows()
        return set(test.loc[test["fold"] == fold, "slide_id"])

    def predictions(self) -> pd.DataFrame:
        """Pooled out-of-fold predictions; ids and labels as strings."""
        return _read_predictions(self.predictions_path)

    def fold_predictions(self, fold: int) -> pd.DataFrame:
        return _read_predictions(self.fold_dir(fold) / "predictions.csv")

    def write_predictions(self, frame: pd.DataFrame, fold: int | None = None) -> None:
        write_csv(self.predictions_path if fold is None else self.fold_dir(fold) / "predictions.csv", frame)

    def baseline_predictions(self) -> pd.DataFrame | None:
        return _read_predictions(self.baseline_path) if self.baseline_path.is_file() else None

    def write_baseline(self, frame: pd.DataFrame) -> None:
        write_csv(self.baseline_path, frame)

    def metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text())

    def record_external(self, name: str, summary: dict) -> Path:
        """external/<name>.json: an external validation of this run (written whole, replaced by a rerun)."""
        path = safe_child(self.external_dir, name, ".json")
        write_json(path, summary)
        return path

    def externals(self) -> dict[str, dict]:
        """{name: summary} of every external validation recorded, by name."""
        if not self.external_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.external_dir.glob("*.json"))
                if not p.name.startswith(".")}

    # -- models -------------------------------------------------------------------------------------
    def fold_meta(self, fold: int) -> dict:
        path = self.fold_dir(fold) / "model.json"
        if not path.is_file():
            raise InputError(f"{path} not found; give the folder of a finished `slidemil train` run")
        return json.loads(path.read_text())

    def fold_models(self, device="cpu", fold: str | int = "all") -> list:
        """[(model in eval mode, model.json)] of every finished fold, or of fold `fold` alone."""
        folds = self.finished_folds()
        if fold != "all":
            folds = [k for k in folds if str(k) == str(fold)]
            if not folds:
                raise InputError(f"--fold {fold}: {self.path} has no finished fold_{fold}")
        elif unfinished := sorted(set(planned := self.planned_folds()) - set(folds)):
            log.warning("%s: fold(s) %s of %d are not finished, so the ensemble is of %d fold(s); finish the run "
                        "with `slidemil train ... --resume`", self.path, ", ".join(map(str, unfinished)),
                        len(planned), len(folds))
        return [load_model(self.fold_dir(k), device) for k in folds]

    def planned_folds(self) -> list[int]:
        """The folds splits.csv lays out (empty for a folder without one)."""
        if not self.splits_path.is_file():
            return []
        return sorted(int(k) for k in read_csv_text(self.splits_path, usecols=["fold"])["fold"].unique())


def _read_predictions(path: Path) -> pd.DataFrame:
    """Ids and labels as strings; `pred` too when it names a class (a `prob_<class>` column exists),
    a number otherwise (regression)."""
    header = pd.read_csv(path, nrows=0).columns
    text = ["slide_id", "case_id", "label"] + (["pred"] if any(c.startswith("prob_") for c in header) else [])
    return read_csv_text(path, dtype={c: str for c in text})
