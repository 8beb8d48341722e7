"""The label table: parse, validate, and attach feature files.

Rows are numbered as a spreadsheet shows them (header = row 1), so an error's row number is the line a
user opens in their editor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.errors import InputError, MissingFeaturesError
from slidemil.features.store import find_feature_file, read_attrs

log = logging.getLogger(__name__)


def _rows(index) -> str:
    rows = [str(int(i) + 2) for i in index]
    return ", ".join(rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


@dataclass
class Cohort:
    """A validated classification cohort: one row per slide.

    `table` has columns slide_id, case_id, label (class name), y (class index), and `site`,
    `split`, `feature_path` when known. `classes` fixes the order of the model's outputs.
    """

    table: pd.DataFrame
    classes: list[str]
    source: str = ""

    @property
    def n_patients(self) -> int:
        return int(self.table["case_id"].nunique())

    def subset(self, slide_ids) -> Cohort:
        keep = self.table["slide_id"].isin(set(slide_ids))
        return Cohort(self.table[keep].reset_index(drop=True), self.classes, self.source)


def read_label_table(
    path: str | os.PathLike,
    label_col: str = "label",
    slide_col: str = "slide_id",
    case_col: str = "case_id",
    classes: list[str] | None = None,
    site_col: str | None = None,
    split_col: str = "split",
    min_patients_per_class: int = 2,
) -> Cohort:
    """Parse a label CSV into a Cohort, with errors that name row and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label table {path} does not exist")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except Exception as exc:  # pandas raises many kinds for a broken CSV
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    found = ", ".join(raw.columns)
    for col, flag in ((slide_col, "--slide-col"), (label_col, "--label-col")):
        if col not in raw.columns:
            raise InputError(f"{path}: column {col!r} is missing (found: {found}); name it with {flag}")
    if site_col and site_col not in raw.columns:
        raise InputError(f"{path}: site column {site_col!r} is missing (found: {found})")

    table = pd.DataFrame({"slide_id": raw[slide_col].str.strip()})
    empty_ids = table["slide_id"].isna() | (table["slide_id"] == "")
    if empty_ids.any():
        raise InputError(f"{path}: column {slide_col!r} is empty in row(s) {_rows(table.index[empty_ids])}")
    dup = table["slide_id"].duplicated(keep=False)
    if dup.any():
        ids = ", ".join(sorted(table.loc[dup, "slide_id"].unique())[:10])
        raise InputError(
            f"{path}: column {slide_col!r} repeats slide id(s) {ids} in rows {_rows(table.index[dup])}; "
            "each slide must appear once (give several slides of a patient the same case_id instead)"
        )
    if case_col in raw.columns:
        case = raw[case_col].str.strip()
        missing_case = case.isna() | (case == "")
        if missing_case.any():
            log.warning("%s: column %r is empty in row(s) %s; using the slide id as the patient id",
                        path, case_col, _rows(table.index[missing_case]))
        table["case_id"] = case.where(~missing_case, table["slide_id"])
    else:
        if case_col != "case_id":
            raise InputError(f"{path}: case column {case_col!r} is missing (found: {found})")
        table["case_id"] = table["slide_id"]
    table["label"] = raw[label_col].str.strip()
    padded = raw[label_col].notna() & (raw[label_col] != table["label"])
    if padded.any():
        log.info("%s: column %r had spaces around the label in row(s) %s; they were stripped",
                 path, label_col, _rows(table.index[padded]))
    if site_col:
        table["site"] = raw[site_col].str.strip()
    if split_col in raw.columns:
        table["split"] = raw[split_col].str.strip().str.lower()

    no_label = table["label"].isna() | (table["label"] == "")
    if no_label.any():
        log.warning("%s: column %r is empty or NaN in row(s) %s; these slides are left out",
                    path, label_col, _rows(table.index[no_label]))
        table = table[~no_label]
    if table.empty:
        raise InputError(f"{path}: no row has a label in column {label_col!r}")

    if classes:
        classes = [str(c).strip() for c in classes]
        table["label"] = _to_classes(table["label"], classes, path, label_col)
        unknown = ~table["label"].isin(classes)
        if unknown.any():
            bad = ", ".join(sorted(table.loc[unknown, "label"].unique()))
            raise InputError(
                f"{path}: column {label_col!r} has label(s) {bad} in row(s) {_rows(table.index[unknown])} "
                f"that are not among --classes {','.join(classes)}"
            )
    else:
        _refuse_variants(table["label"], path, label_col)
        classes = sorted(table["label"].unique(), key=_natural_key)
    if len(classes) < 2:
        raise InputError(f"{path}: column {label_col!r} holds a single class ({classes[0]}); need two or more")
    table["y"] = table["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)

    per_class = table.groupby("label")["case_id"].nunique()
    for cls in classes:
        n = int(per_class.get(cls, 0))
        if n < min_patients_per_class:
            rows = _rows(table.index[table["label"] == cls])
            raise InputError(
                f"{path}: class {cls!r} of column {label_col!r} has {n} patient(s) (row(s) {rows or 'none'}); "
                f"cross-validation needs at least {min_patients_per_class} per class, one to train and one "
                "to test. Add patients, merge the class with another, or drop it."
            )
    mixed = table.groupby("case_id")["label"].nunique()
    if (mixed > 1).any():
        log.warning("%s: patient(s) %s have slides with different labels; splits keep them together",
                    path, ", ".join(mixed[mixed > 1].index[:10]))
    return Cohort(table.reset_index(drop=True), list(classes), str(path))


def _variant_key(value: str):
    """Labels that differ only by letter case or by how a number is written share a key ("Tumor" and
    "tumor"; "1", "1.0" and "01")."""
    try:
        return ("number", float(value))
    except ValueError:
        return ("text", value.casefold())


def _refuse_variants(labels: pd.Series, path: Path, label_col: str) -> None:
    """Spelling variants of one label would silently train as different classes: name them and their rows."""
    groups: dict = {}
    for value in labels.unique():
        groups.setdefault(_variant_key(value), []).append(value)
    clashes = [sorted(v) for v in groups.values() if len(v) > 1]
    if clashes:
        parts = "; ".join(" / ".join(f"{v!r} (row(s) {_rows(labels.index[labels == v])})" for v in group)
                          for group in clashes)
        raise InputError(f"{path}: column {label_col!r} spells one label several ways: {parts}. Write each "
                         "class one way, or pass --classes to say which spelling each class has")


def _to_classes(labels: pd.Series, classes: list[str], path: Path, label_col: str) -> pd.Series:
    """With --classes, a label that is a spelling variant of exactly one class is read as that class."""
    by_key: dict = {}
    for c in classes:
        by_key.setdefault(_variant_key(c), []).append(c)
    mapped = labels.copy()
    for value in labels.unique():
        match = by_key.get(_variant_key(value), [])
        if value not in classes and len(match) == 1:
            rows = labels.index[labels == value]
            log.info("%s: column %r value %r in row(s) %s is read as class %r", path, label_col, value,
                     _rows(rows), match[0])
            mapped[rows] = match[0]
    return mapped


def _natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def attach_features(cohort: Cohort, feature_dir: str | os.PathLike, skip_missing: bool = False) -> Cohort:
    """Locate every slide's feature file; stop with the whole list of problems unless `skip_missing`.

    A file that exists but cannot be opened counts as missing: better to learn it now than mid-fold.
    """
    feature_dir = Path(feature_dir)
    if not feature_dir.is_dir():
        raise InputError(f"feature folder {feature_dir} does not exist")
    paths, problems, dims = [], {}, {}
    for sid in cohort.table["slide_id"]:
        try:
            path = find_feature_file(feature_dir, sid)
        except ValueError as exc:
            problems[sid] = str(exc)
            paths.append(None)
            continue
        if path is None:
            problems[sid] = f"no {sid}.h5 or {sid}.pt under {feature_dir}"
        else:
            try:
                dims[sid] = read_attrs(path).get("embedding_dim")
            except Exception as exc:
                problems[sid] = f"{path} is unreadable ({type(exc).__name__}: {exc})"
                path = None
        paths.append(str(path) if path else None)
    table = cohort.table.assign(feature_path=paths)
    known = {d for d in dims.values() if d}
    if len(known) > 1:
        raise InputError(f"{feature_dir}: feature files disagree on the embedding dimension ({sorted(known)}); "
                         "were they made by different encoders?")
    if problems:
        if not skip_missing:
            raise MissingFeaturesError(problems)
        log.warning("skipping %d slide(s) without readable features: %s", len(problems),
                    ", ".join(sorted(problems)[:20]))
        table = table[table["feature_path"].notna()].reset_index(drop=True)
    return Cohort(table, cohort.classes, cohort.source)
