"""Patient-grouped splits: outer k-fold for testing, an inner split for validation.

A patient (``case_id``) never sits in two roles of one fold. Splits are a pure function of the cohort
and the seed; they are saved to ``splits.csv`` (slide_id, case_id, fold, role) and can be read back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from slidemil.data.cohort import Cohort
from slidemil.errors import InputError
from slidemil.utils.io import read_csv_text

log = logging.getLogger(__name__)
ROLES = ("train", "val", "test")


def _groups_per_class(y: np.ndarray, groups: np.ndarray) -> dict:
    return {int(c): len(np.unique(groups[y == c])) for c in np.unique(y)}


def _grouped_kfold(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Index arrays of the k test parts, stratified by label and grouped by `groups`."""
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise InputError(f"{n_groups} groups (patients or sites) cannot fill {k} folds; lower --folds")
    per_class = _groups_per_class(y, groups)
    if min(per_class.values()) < k:
        c, n = min(per_class.items(), key=lambda kv: kv[1])
        raise InputError(f"class index {c} has {n} patient(s) (or sites); {k} folds need at least {k} per class "
                         "so that every test fold holds each class; lower --folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]


def _inner_val(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation part of a training fold (grouped, stratified, ~`fraction`)."""
    if fraction <= 0:
        return np.zeros(len(y), dtype=bool)
    wanted = max(2, int(round(1.0 / fraction)))
    per_class = _groups_per_class(y, groups)
    k = min(wanted, min(per_class.values()))
    if k < 2:
        log.warning("a training fold has a class with fewer than 2 patients: no validation split, the last "
                    "epoch is kept")
        return np.zeros(len(y), dtype=bool)
    mask = np.zeros(len(y), dtype=bool)
    mask[_grouped_kfold(y, groups, k, seed)[0]] = True
    if k < wanted:   # every class keeps a validation patient, at the cost of a larger validation share
        share = len(np.unique(groups[mask])) / len(np.unique(groups))
        log.warning("a training fold's smallest class has %d patients, so its validation split holds %.0f%% of the "
                    "patients (--val-fraction %g) and each class is in it; more patients of that class would let "
                    "training keep more", min(per_class.values()), 100 * share, fraction)
    return mask


def make_splits(
    cohort: Cohort,
    folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    preserve_site: bool = False,
    strata: np.ndarray | None = None,
    cv: str = "kfold",
) -> pd.DataFrame:
    """Stratified k-fold grouped by patient (or by site with `preserve_site`), with inner validation;
    `cv="leave-site-out"`: one fold per site (sorted by name), its test set that site's slides, the
    inner validation drawn from the other (training) sites.

    `strata` (one integer per row; default the class index `y`) is what the folds keep balanced: the
    task gives it (survival: event and time quantile; regression: target quantile). With a ``split``
    column in the cohort, that predefined train/val/test assignment is used as a single fold instead.
    """
    table = cohort.table
    if "split" in table.columns and table["split"].notna().any():
        return _predefined(table)
    y = table["y"].to_numpy() if strata is None else np.asarray(strata)
    groups = table["case_id"].to_numpy()
    if cv == "leave-site-out":
        sites = _sites(table, "--cv leave-site-out")
        if len(np.unique(sites)) < 2:
            raise InputError(f"--cv leave-site-out needs at least two sites; the label table has one ({sites[0]})")
        tests = [np.flatnonzero(sites == s) for s in np.unique(sites)]
        log.info("leave-site-out: %s", ", ".join(f"fold {k} = site {s}" for k, s in enumerate(np.unique(sites))))
    else:
        outer_groups = _sites(table, "--preserve-site") if preserve_site else groups
        tests = _grouped_kfold(y, outer_groups, folds, seed)
    rows = []
    for fold, test_idx in enumerate(tests):
        role = np.full(len(table), "train", dtype=object)
        role[test_idx] = "test"
        train_idx = np.flatnonzero(role == "train")
        val = _inner_val(y[train_idx], groups[train_idx], val_fraction, seed + 1000 + fold)
        role[train_idx[val]] = "val"
        rows.append(pd.DataFrame({"slide_id": table["slide_id"], "case_id": table["case_id"],
                                  "fold": fold, "role": role}))
    splits = pd.concat(rows, ignore_index=True)
    check_splits(splits)
    return splits


def _sites(table: pd.DataFrame, option: str) -> np.ndarray:
    """Each slide's site, checked: the column exists and no patient spans two sites."""
    if "site" not in table.columns:
        raise InputError(f"{option} needs a site column in the label table (--site-col)")
    spans = table.groupby("case_id")["site"].nunique()
    if (spans > 1).any():
        raise InputError(f"patient(s) {', '.join(spans[spans > 1].index[:10])} have slides from several "
                         f"sites; {option} needs each patient at one site")
    return table["site"].to_numpy()


def _predefined(table: pd.DataFrame) -> pd.DataFrame:
    bad = ~table["split"].isin(ROLES)
    if bad.any():
        rows = ", ".join(str(i + 2) for i in table.index[bad][:10])
        raise InputError(f"column 'split' must be train, val or test; row(s) {rows} hold "
                         f"{sorted(table.loc[bad, 'split'].astype(str).unique())}")
    splits = pd.DataFrame({"slide_id": table["slide_id"], "case_id": table["case_id"], "fold": 0,
                           "role": table["split"]})
    check_splits(splits)
    return splits


def check_splits(splits: pd.DataFrame) -> None:
    """Raise when a patient holds two roles in one fold, or a fold has no train or test slide."""
    for fold, part in splits.groupby("fold"):
        roles = part.groupby("case_id")["role"].nunique()
        leaky = roles[roles > 1]
        if len(leaky):
            raise InputError(f"fold {fold}: patient(s) {', '.join(map(str, leaky.index[:10]))} appear in more "
                             "than one of train/val/test; a patient's slides must share one role")
        for role in ("train", "test"):
            if not (part["role"] == role).any():
                raise InputError(f"fold {fold} has no {role} slides")


def read_splits(path: str | os.PathLike, cohort: Cohort) -> pd.DataFrame:
    """Read a ``splits.csv`` (slide_id, fold, role[, case_id]) and check it against the cohort."""
    path = Path(path)
    try:
        splits = read_csv_text(path, dtype={"slide_id": str, "case_id": str, "role": str})
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from exc
    for col in ("slide_id", "fold", "role"):
        if col not in splits.columns:
            raise InputError(f"{path}: column {col!r} is missing (found: {', '.join(splits.columns)})")
    known = set(cohort.table["slide_id"])
    unknown = sorted(set(splits["slide_id"]) - known)
    if unknown:
        log.warning("%s: %d slide(s) are not in the cohort and are ignored: %s", path, len(unknown),
                    ", ".join(unknown[:10]))
        splits = splits[splits["slide_id"].isin(known)]
    case_of = dict(zip(cohort.table["slide_id"], cohort.table["case_id"]))
    splits = splits.assign(case_id=splits["slide_id"].map(case_of), role=splits["role"].str.lower())
    bad = ~splits["role"].isin(ROLES)
    if bad.any():
        raise InputError(f"{path}: column 'role' must be train, val or test (row(s) "
                         f"{', '.join(str(i + 2) for i in splits.index[bad][:10])})")
    splits = splits[["slide_id", "case_id", "fold", "role"]].reset_index(drop=True)
    check_splits(splits)
    return splits
