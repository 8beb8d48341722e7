"""The reference baseline every run reports beside its model: a tuned linear model on mean-pooled features,
trained and tested on the run's own folds (logistic regression for classification, ridge for regression,
a ridge Cox model for survival).
Reviewers ask for it, and a MIL model below it is a warning sign (protocol: docs/protocol.md)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from slidemil.data.bags import BagDataset, bag_units
from slidemil.data.cohort import Cohort
from slidemil.rundir import RunDir
from slidemil.tasks import Task

log = logging.getLogger(__name__)


def mean_pooled(cohort: Cohort, bag_unit: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit ids, [n, D] mean of each bag's instances, targets), read once from the feature files."""
    ds = BagDataset(bag_units(cohort, bag_unit), cache=False)
    means = np.stack([x.mean(0, dtype=torch.float64).numpy() for x in ds.raw_bags()])
    return [u[0] for u in ds.units], means, ds.labels()


def write_baseline(run: RunDir, cohort: Cohort, splits: pd.DataFrame, task: Task, bag_unit: str, seed: int,
                   prediction_table) -> None:
    """baseline_predictions.csv: the task's baseline fitted on each fold's training and validation bags (its
    own inner, patient-grouped CV tunes it) and applied to the fold's test bags; nothing when the task has
    no baseline. Written once per run (it takes seconds); a rerun rewrites it."""
    if not task.has_baseline:
        return
    ids, feats, targets = mean_pooled(cohort, bag_unit)
    key = "case_id" if bag_unit == "patient" else "slide_id"
    unit_of = dict(zip(cohort.table["slide_id"], cohort.table[key]))                  # slide -> its bag
    case_of = dict(zip(cohort.table[key], cohort.table["case_id"].astype(str)))      # bag -> its patient
    groups = np.array([case_of[i] for i in ids])
    parts = []
    for fold in sorted(splits["fold"].unique()):
        rows = splits[splits["fold"] == fold]
        test = {unit_of[s] for s in rows.loc[rows["role"] == "test", "slide_id"]}
        fit = {unit_of[s] for s in rows.loc[rows["role"] != "test", "slide_id"]}
        tr = np.array([i in fit for i in ids])
        te = np.array([i in test for i in ids])
        columns = task.baseline_columns(feats[tr], targets[tr], groups[tr], feats[te], {"classes": cohort.classes}, seed)
        frame = prediction_table([i for i, t in zip(ids, te) if t], columns, cohort, bag_unit)
        frame.insert(2, "fold", int(fold))
        parts.append(frame)
    run.write_baseline(pd.concat(parts, ignore_index=True))
    log.info("reference baseline (%s) written to %s", task.baseline_name, run.baseline_path.name)
