"""The label table: parse, validate, and attach feature files.

Rows are numbered as a spreadsheet shows them (header = row 1), so an error's row number is the line a
user opens in their editor.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.errors import InputError, MissingFeaturesError
from slidemil.features.store import (
    check_feature_file,
    feature_files,
    locate_features,
    most_common_attrs,
    read_attrs,
    unlike_reference,
)
from slidemil.utils.io import SAFE_ID_RULE, delimiter, is_safe_id, read_csv_text, safe_child
from slidemil.utils.memory import release_free_heap

log = logging.getLogger(__name__)


def row_list(index) -> str:
    rows = [str(int(i) + 2) for i in index]
    return ", ".join(rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


@dataclass
class Cohort:
    """A validated cohort: one row per slide.

    `table` has columns slide_id, case_id, the task's columns (classification and ordinal: label, the
    class name, and y, its index; survival: time, event; regression: target), and `site`, `split`,
    `feature_path` when known. `classes` fixes the order of a classifier's outputs (empty for outcomes
    without classes). A bag's target is made of `target_cols`; `label_cols` go into predictions.csv.
    """

    table: pd.DataFrame
    classes: list[str]
    source: str = ""
    excluded: dict[str, str] = field(default_factory=dict)   # slide_id -> why it was left out
    target_cols: tuple[str, ...] = ("y",)
    label_cols: tuple[str, ...] = ("label",)

    @property
    def n_patients(self) -> int:
        return int(self.table["case_id"].nunique())

    def subset(self, slide_ids) -> Cohort:
        keep = self.table["slide_id"].isin(set(slide_ids))
        return self.with_table(self.table[keep].reset_index(drop=True))

    def with_table(self, table: pd.DataFrame, excluded: dict[str, str] | None = None) -> Cohort:
        return Cohort(table, self.classes, self.source, self.excluded if excluded is None else excluded,
                      self.target_cols, self.label_cols)


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
    """Parse a classification label CSV into a Cohort, with errors that name row and column."""
    raw, table = read_table(path, slide_col, case_col, site_col, split_col, needed={label_col: "--label-col"})
    return parse_class_labels(raw, table, Path(path), label_col, classes, min_patients_per_class)


def read_table(path: str | os.PathLike, slide_col: str = "slide_id", case_col: str = "case_id",
               site_col: str | None = None, split_col: str = "split",
               needed: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(raw CSV as strings, table of slide_id, case_id[, site, split]) with what every task checks:
    the columns exist (`needed`: column -> the flag that names it), slide ids are present, unique and
    safe as file names."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label table {path} does not exist")
    try:
        # only an empty cell is missing: pandas' default would also read "NA", "None", "nan", "null" ... as
        # missing, so a patient called NA lost its id (its slides split over folds) and a class "None" vanished
        raw = read_csv_text(path, dtype=str, skipinitialspace=True)
    except InputError:
        raise
    except Exception as exc:  # pandas raises many kinds for a broken CSV
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from exc
    _refuse_repeated_columns(path)
    raw.columns = [str(c).strip() for c in raw.columns]
    found = ", ".join(raw.columns)
    for col, flag in ((slide_col, "--slide-col"), *(needed or {}).items()):
        if col not in raw.columns:
            raise InputError(f"{path}: column {col!r} is missing (found: {found}); name it with {flag}")
    if site_col and site_col not in raw.columns:
        raise InputError(f"{path}: site column {site_col!r} is missing (found: {found})")

    table = pd.DataFrame({"slide_id": raw[slide_col].str.strip()})
    empty_ids = table["slide_id"].isna() | (table["slide_id"] == "")
    if empty_ids.any():
        raise InputError(f"{path}: column {slide_col!r} is empty in row(s) {row_list(table.index[empty_ids])}")
    unsafe = ~table["slide_id"].map(is_safe_id)
    if unsafe.any():
        ids = ", ".join(repr(s) for s in table.loc[unsafe, "slide_id"][:10])
        raise InputError(f"{path}: column {slide_col!r} has slide id(s) {ids} in row(s) {row_list(table.index[unsafe])} "
                         f"that cannot be file names: use {SAFE_ID_RULE}")
    dup = table["slide_id"].duplicated(keep=False)
    if dup.any():
        ids = ", ".join(sorted(table.loc[dup, "slide_id"].unique())[:10])
        raise InputError(
            f"{path}: column {slide_col!r} repeats slide id(s) {ids} in rows {row_list(table.index[dup])}; "
            "each slide must appear once (give several slides of a patient the same case_id instead)"
        )
    if case_col in raw.columns:
        case = raw[case_col].str.strip()
        missing_case = case.isna() | (case == "")
        if missing_case.any():
            log.warning("%s: column %r is empty in row(s) %s; using the slide id as the patient id",
                        path, case_col, row_list(table.index[missing_case]))
        table["case_id"] = case.where(~missing_case, table["slide_id"])
    else:
        if case_col != "case_id":
            raise InputError(f"{path}: case column {case_col!r} is missing (found: {found})")
        table["case_id"] = table["slide_id"]
        _check_slides_as_patients(table, path)
    if site_col:
        table["site"] = raw[site_col].str.strip()
        no_site = table["site"].isna() | (table["site"] == "")
        if no_site.any():
            raise InputError(f"{path}: site column {site_col!r} is empty in row(s) {row_list(table.index[no_site])}; "
                             f"give every slide its centre (a name such as 'unknown' is a centre of its own)")
    if split_col in raw.columns:
        table["split"] = raw[split_col].str.strip().str.lower()
    return raw, table


TCGA_PATIENT = r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-"     # a TCGA barcode's first three fields name the patient


def _check_slides_as_patients(table: pd.DataFrame, path: Path) -> None:
    """Without a case_id column every slide is its own patient, so a patient's slides could sit in different
    folds (a leak): said in the log, and refused where TCGA barcodes show two slides of one patient."""
    patients = table["slide_id"].str.extract(TCGA_PATIENT, expand=False)
    shared = patients[patients.notna() & patients.duplicated(keep=False)]
    if len(shared):
        raise InputError(f"{path}: no case_id column, so every slide would be its own patient, but {len(shared)} "
                         f"slides share a TCGA patient barcode (e.g. {', '.join(table.loc[shared.index[:2], 'slide_id'])}) "
                         "and could land in different folds: add a case_id column (the barcode's first 12 characters)")
    log.warning("%s: no case_id column, so every slide is taken as its own patient; if a patient has several "
                "slides, add a case_id column so that they share a fold", path)


def _refuse_repeated_columns(path: Path) -> None:
    """A header naming one column twice is an error: pandas would rename the second ("label.1") and every
    reader would silently take the first."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        header = [c.strip() for c in next(csv.reader(fh, delimiter=delimiter(path)), [])]
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header, 1):
        seen.setdefault(name, []).append(i)
    repeated = {name: cols for name, cols in seen.items() if len(cols) > 1 and name}
    if repeated:
        which = "; ".join(f"{name!r} in columns {', '.join(map(str, cols))}" for name, cols in repeated.items())
        raise InputError(f"{path}: the header names a column more than once ({which}); keep one of each, or "
                         f"rename the others")


def parse_class_labels(raw: pd.DataFrame, table: pd.DataFrame, path: Path, label_col: str = "label",
                       classes: list[str] | None = None, min_patients_per_class: int = 2) -> Cohort:
    """Class names from `label_col` into `label` and `y` (index into `classes`: given, or sorted naturally)."""
    table = table.copy()
    table["label"] = raw[label_col].str.strip()
    padded = raw[label_col].notna() & (raw[label_col] != table["label"])
    if padded.any():
        log.info("%s: column %r had spaces around the label in row(s) %s; they were stripped",
                 path, label_col, row_list(table.index[padded]))
    table = drop_empty(table, "label", path, label_col)

    if classes:
        classes = [str(c).strip() for c in classes]
        table["label"] = _to_classes(table["label"], classes, path, label_col)
        unknown = ~table["label"].isin(classes)
        if unknown.any():
            bad = ", ".join(sorted(table.loc[unknown, "label"].unique()))
            raise InputError(
                f"{path}: column {label_col!r} has label(s) {bad} in row(s) {row_list(table.index[unknown])} "
                f"that are not among the classes {', '.join(classes)} (given by --classes, or the classes a trained "
                f"run predicts); correct those labels or leave their rows out"
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
            rows = row_list(table.index[table["label"] == cls])
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


# how clinical exports mark a missing number (GDC "'--", cBioPortal and TCGA "[Not Available]", ...); only
# numeric columns read them as missing: in a label column "NA" may be a class
MISSING_NUMBERS = {"'--", "--", "na", "n/a", "nan", "[not available]", "[not applicable]", "[unknown]",
                   "[not evaluated]", "[discrepancy]", "unknown", "not reported"}


def drop_empty(table: pd.DataFrame, col: str, path: Path, source_col: str, numeric: bool = False) -> pd.DataFrame:
    """Rows without a value in `col` (`numeric`: or with a clinical export's missing marker) are left out
    with a warning; none left is an error."""
    empty = table[col].isna() | (table[col] == "")
    if numeric:
        empty |= table[col].astype(str).str.strip().str.lower().isin(MISSING_NUMBERS)
    if empty.any():
        log.warning("%s: column %r is empty or marked missing in row(s) %s; these slides are left out",
                    path, source_col, row_list(table.index[empty]))
        table = table[~empty]
    if table.empty:
        raise InputError(f"{path}: no row has a value in column {source_col!r}")
    return table


def numeric_column(raw: pd.DataFrame, table: pd.DataFrame, path: Path, col: str, what: str) -> pd.Series:
    """Column `col` of the rows in `table` as floats; empty rows are left out by the caller, text is an
    error naming the rows."""
    values = raw.loc[table.index, col].str.strip()
    number = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & (values != "") & (number.isna() | ~np.isfinite(number.fillna(0)))
    if bad.any():
        shown = ", ".join(repr(v) for v in values[bad].unique()[:5])
        comma = values[bad].str.fullmatch(r"-?\d+,\d+").any()
        raise InputError(f"{path}: column {col!r} must hold numbers ({what}); row(s) {row_list(table.index[bad])} "
                         f"hold {shown}" + (" (write the decimal point as '.', not ',')" if comma else ""))
    return number


def same_per_patient(table: pd.DataFrame, cols: list[str], path: Path, names: list[str]) -> None:
    """A patient's slides must agree on a patient-level outcome (survival time and event, a target)."""
    for col, name in zip(cols, names):
        differ = table.groupby("case_id")[col].nunique(dropna=False)
        bad = differ[differ > 1].index
        if len(bad):
            rows = table.index[table["case_id"].isin(bad)]
            raise InputError(f"{path}: patient(s) {', '.join(map(str, bad[:10]))} have different values of column "
                             f"{name!r} on their slides (row(s) {row_list(rows)}); a patient has one outcome: "
                             "give every slide of a patient the same value")


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
        parts = "; ".join(" / ".join(f"{v!r} (row(s) {row_list(labels.index[labels == v])})" for v in group)
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
                     row_list(rows), match[0])
            mapped[rows] = match[0]
    return mapped


def _natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _check_provenance(paths: dict[str, str], bad: dict[str, str]) -> None:
    """Files of another encoder than most (two encoders can share a dimension: UNI and CLAM's ResNet-50 are
    both 1024-d) are unusable, moved from `paths` to `bad`; other differences (resolution, patch size, encoder
    weights, stain normalisation) are warned about: they were silent."""
    attrs = {sid: read_attrs(path) for sid, path in paths.items()}
    encoders = Counter(str(a["encoder"]) for a in attrs.values() if a.get("encoder") is not None)
    if len(encoders) > 1:
        common = encoders.most_common(1)[0][0]
        for sid, a in list(attrs.items()):
            if a.get("encoder") is not None and str(a["encoder"]) != common:
                bad[sid] = f"{paths.pop(sid)}: made by encoder {a['encoder']!r}, the other files by {common!r}"
                del attrs[sid]
    by_path = {Path(paths[sid]): a for sid, a in attrs.items()}
    for line in unlike_reference(most_common_attrs(by_path), by_path, "the others"):
        log.warning("%s", line)


def _extension_hint(slide_id: str) -> str:
    """A hint for an id written with its file's extension (`X.svs`, `X.h5`): ids are names without it."""
    suffix = Path(slide_id).suffix
    if suffix.lower() in (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".bif", ".dcm", ".h5", ".pt", ".png", ".jpg"):
        return f" (slide_id is the file name without its extension: {slide_id[: -len(suffix)]}, not {slide_id})"
    return ""


def _say_prefix_matches(located: dict[str, Path]) -> None:
    """One log line when ids were matched to files named `<id>.<suffix>` (GDC's `<barcode>.<UUID>`)."""
    by_prefix = {sid: p for sid, p in located.items() if p.stem != sid}
    if by_prefix:
        sid, path = next(iter(by_prefix.items()))
        log.info("%d slide id(s) matched to a feature file named <slide_id>.<suffix> (e.g. %s -> %s), as the GDC "
                 "names TCGA slides <barcode>.<UUID>", len(by_prefix), sid, path.name)


def attach_features(cohort: Cohort, feature_dir: str | os.PathLike, skip_missing: bool = False,
                    skip_bad: bool = False) -> Cohort:
    """Locate and check every slide's feature file before anything trains; stop with the whole list of
    problems, or leave the slides out (`skip_missing` for absent or unreadable files, `skip_bad` for
    unusable content: not [N, D], empty, NaN/Inf, coords that do not match, another dimension). Files
    are read in chunks, so the check needs no more memory than one chunk."""
    feature_dir = Path(feature_dir)
    if not feature_dir.is_dir():
        raise InputError(f"feature folder {feature_dir} does not exist")
    paths, missing, bad, dims = {}, {}, {}, {}
    ids = list(cohort.table["slide_id"])
    for sid in ids:
        try:
            safe_child(feature_dir, sid)   # refuses ids such as "../x" that would reach outside the folder
        except ValueError as exc:
            missing[sid] = str(exc)
    files = feature_files(feature_dir)
    located, ambiguous = locate_features(feature_dir, [s for s in ids if s not in missing], files)
    _say_prefix_matches(located)
    if unused := sorted(set(files.values()) - set(located.values())):
        log.info("%d feature file(s) under %s have no row in the label table and are not used (e.g. %s)",
                 len(unused), feature_dir, unused[0].name)
    for sid in ids:
        if sid in missing:
            continue
        if (path := located.get(sid)) is None:
            missing[sid] = ambiguous.get(sid) or f"no {sid}.h5 or {sid}.pt under {feature_dir}" + _extension_hint(sid)
            continue
        dim, problem = check_feature_file(path)
        release_free_heap()     # the check's chunk buffers: glibc would keep them resident for the whole run
        if problem is not None:
            (missing if problem.startswith("unreadable") else bad)[sid] = f"{path}: {problem}"
            continue
        paths[sid], dims[sid] = str(path), dim
    if dims:
        common, _ = Counter(dims.values()).most_common(1)[0]
        for sid, dim in dims.items():
            if dim != common:
                bad[sid] = f"{paths.pop(sid)}: features are {dim}-d but the other files are {common}-d (another encoder?)"
    _check_provenance(paths, bad)
    if (missing and not skip_missing) or (bad and not skip_bad):
        raise MissingFeaturesError(missing if not skip_missing else {}, bad if not skip_bad else {})
    excluded = {**missing, **bad}
    if excluded:
        log.warning("leaving out %d slide(s) whose features are missing or unusable: %s", len(excluded),
                    ", ".join(sorted(excluded)[:20]))
    table = cohort.table.assign(feature_path=cohort.table["slide_id"].map(paths))
    table = table[table["feature_path"].notna()].reset_index(drop=True)
    if table.empty:
        raise InputError(f"{feature_dir}: no slide of the label table has usable features")
    return cohort.with_table(table, {**cohort.excluded, **excluded})
