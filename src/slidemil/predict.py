"""`slidemil predict`: apply every fold of a run to a new cohort's features and average the folds; with
the cohort's labels, also its metrics (external validation)."""

from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path

import pandas as pd

from slidemil.data.bags import BagDataset
from slidemil.data.cohort import read_table
from slidemil.errors import InputError, MissingFeaturesError
from slidemil.features.store import (
    check_compatible,
    check_feature_file,
    locate_features,
    read_attrs,
    unlike_reference,
)
from slidemil.rundir import RunDir
from slidemil.tasks import create_task, model_task, render_report, sample_caveats, site_metrics
from slidemil.train.trainer import infer
from slidemil.utils.device import resolve_device
from slidemil.utils.ids import match_ids
from slidemil.utils.io import SAFE_ID_RULE, is_safe_id, read_csv_text

log = logging.getLogger(__name__)


def check_output(out: Path, run: str | Path, inputs: dict[str, Path | None], force: bool = False) -> None:
    """Refuse an --out that would overwrite a run's own files (predictions, metrics, splits: `evaluate` then
    fails) or an input, before anything is computed; `force` allows it. metrics.json is written beside --out,
    so a folder that holds a run is refused too."""
    if force:
        return
    target, run_dir = out.expanduser().resolve(), Path(run).expanduser().resolve()
    for flag, path in inputs.items():
        if path is not None and target == Path(path).expanduser().resolve():
            raise InputError(f"--out {out} is the {flag} input; write the predictions elsewhere (or pass --force)")
    if target.is_relative_to(run_dir) or (target.parent / "config.yaml").is_file():
        holder = run_dir if target.is_relative_to(run_dir) else target.parent
        raise InputError(f"--out {out} is inside the run folder {holder}, whose predictions, metrics and splits "
                         f"it would overwrite; write it elsewhere (or pass --force)")


def patient_bags(run: RunDir, slides: list[str], labels: str | Path | None) -> dict[str, list[str]]:
    """{case_id: its slide ids} for a run trained on patient bags (`--bag-unit patient`), from the label
    table's slide and patient columns: its folds saw each patient's slides as one bag, so prediction must too
    (scoring slides one by one and averaging would apply the model to inputs it was never trained on)."""
    if labels is None:
        raise InputError(f"{run.path} was trained on patient bags (--bag-unit patient): pass --labels with the "
                         "cohort's slide and patient columns so that each patient's slides are scored as one bag")
    cfg = run.config()
    _, table = read_table(labels, slide_col=cfg.get("slide_col", "slide_id"), case_col=cfg.get("case_col", "case_id"))
    case_of = dict(zip(table["slide_id"], table["case_id"]))
    unknown = [sid for sid in slides if sid not in case_of]
    if unknown:
        raise InputError(f"{labels}: slide(s) {', '.join(unknown[:10])} have features but no row naming their "
                         "patient; add them, or leave them out with --slide-ids")
    groups: dict[str, list[str]] = {}
    for sid in slides:
        groups.setdefault(str(case_of[sid]), []).append(sid)
    return groups


def _ids_as_labelled(run: RunDir, stems: list[str], labels: str | Path) -> list[str]:
    """The feature files' names, each file that a slide id of the label table matches (`utils.ids`: a TCGA
    file `<barcode>.<UUID>` for the barcode) renamed to that id, so that the predictions meet their labels."""
    col = run.config().get("slide_col", "slide_id")
    if not Path(labels).is_file() or col not in read_csv_text(labels, nrows=0).columns:
        return stems            # the label table's own check names the problem
    found, _ = match_ids(read_csv_text(labels, usecols=[col], dtype=str)[col].str.strip(), stems)
    named = {stem: sid for sid, stem in found.items()}
    return [named.get(stem, stem) for stem in stems]


def predict(run: str | Path, feature_dir: str | Path, slide_ids: list[str] | None = None, device: str = "auto",
            skip_missing: bool = False, max_instances: int | None = None,
            labels: str | Path | None = None) -> pd.DataFrame:
    """One row per slide: slide_id, then the run task's fold-ensemble columns (classification:
    prob_<class>, pred, fold<k>_prob_<class>; survival: risk, risk_group, fold<k>_risk; regression:
    pred, fold<k>_pred). A run trained on patient bags gives one row per patient instead (case_id,
    slide_ids joined by ';'), its slides grouped by `labels`. Bags over `max_instances` are scored chunk by
    chunk where the model can."""
    run, feature_dir = RunDir(run), Path(feature_dir)
    dev = resolve_device(device)
    if not feature_dir.is_dir():
        raise InputError(f"--features {feature_dir} is not a folder")
    if slide_ids is None:
        # hidden files are not slides: macOS leaves `._X.h5` (AppleDouble) beside every X.h5 it copies
        files = sorted(p for p in feature_dir.iterdir() if p.suffix in (".h5", ".pt") and not p.name.startswith("."))
        if not files and (feature_dir / "pt_files").is_dir():
            files = sorted(p for p in (feature_dir / "pt_files").glob("*.pt") if not p.name.startswith("."))
        slide_ids = [p.stem for p in files]
        if labels is not None:
            slide_ids = _ids_as_labelled(run, slide_ids, labels)
    if not slide_ids:
        raise InputError(f"{feature_dir} holds no feature files (.h5 or .pt)")
    paths, missing = {}, {}
    located, ambiguous = locate_features(feature_dir, [sid for sid in slide_ids if is_safe_id(sid)])
    for sid in slide_ids:
        if not is_safe_id(sid):
            missing[sid] = f"not usable as a slide id ({SAFE_ID_RULE}): rename the file"
            continue
        p = located.get(sid)
        if p is None:
            missing[sid] = ambiguous.get(sid) or f"no feature file under {feature_dir}"
        elif (problem := check_feature_file(p)[1]) is not None:
            missing[sid] = f"{p}: {problem}"
        else:
            paths[sid] = p
    if missing and not skip_missing:
        raise MissingFeaturesError(missing)
    if missing:
        log.warning("--skip-missing: %d slide(s) left out of the predictions: %s", len(missing),
                    "; ".join(f"{sid} ({why})" for sid, why in list(missing.items())[:10]))
    if not paths:
        raise InputError(f"{feature_dir}: no slide has usable features")
    models = run.fold_models(dev)
    meta = models[0][1]
    attrs = {p: read_attrs(p) for p in paths.values()}
    for p, a in attrs.items():
        check_compatible(meta, a, p)
    unlike = unlike_reference(meta.get("encoder", {}), attrs, "the run's training features")
    for line in unlike:
        log.warning("%s", line)
    by_patient = meta.get("bag_unit") == "patient"
    groups = patient_bags(run, list(paths), labels) if by_patient else {sid: [sid] for sid in paths}
    units = [(key, [str(paths[sid]) for sid in sids], 0) for key, sids in groups.items()]
    dataset = BagDataset(units, cache=len(models) > 1)
    folds = [(m, infer(model, dataset, dev, chunk=max_instances).logits) for model, m in models]
    frame = model_task(meta).ensemble(folds)
    if by_patient:
        frame.insert(0, "case_id", list(groups))
        frame.insert(1, "slide_ids", [";".join(sids) for sids in groups.values()])
    else:
        frame.insert(0, "slide_id", list(paths))
    frame.attrs["warnings"] = unlike          # validate_external adds them to the external metrics' caveats
    return frame


def validate_external(run: str | Path, preds: pd.DataFrame, labels: str | Path, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """The run task's metrics with patient-bootstrap CIs on an external cohort: `preds` from `predict`,
    `labels` a label table with the columns the run was trained with."""
    run = RunDir(run)
    metas = [run.fold_meta(k) for k in run.finished_folds()]
    # the run's task with its column names; a class outside the model's classes is an error naming its rows;
    # the run's site column only where this cohort has one (then the metrics come per site too)
    cfg = {**run.config(), "classes": metas[0].get("classes") or None}
    if cfg.get("site_col") and Path(labels).is_file() and cfg["site_col"] not in read_csv_text(labels, nrows=0).columns:
        cfg["site_col"] = None
    task = create_task(cfg)
    cohort = task.read(labels)
    by_patient = metas[0].get("bag_unit") == "patient"    # `predict` gave one row per patient
    key = "case_id" if by_patient else "slide_id"
    table = (cohort.table.drop_duplicates("case_id") if by_patient else cohort.table).set_index(key)
    known = preds[key].isin(table.index)
    if not known.any():
        raise InputError(f"{labels}: none of the {len(preds)} predicted {key}s is in the label table")
    if (~known).any():
        log.warning("%d predicted %s(s) are not in %s and are left out of the metrics: %s", int((~known).sum()),
                    key, labels, ", ".join(preds.loc[~known, key][:10]))
    scored = preds[known].reset_index(drop=True)
    rows = table.loc[scored[key]]
    if by_patient:       # one bag per patient, as in the run's own predictions.csv
        scored = scored.drop(columns="slide_ids")
        scored.insert(0, "slide_id", scored["case_id"])
    else:
        scored.insert(1, "case_id", rows["case_id"].to_numpy())
    for i, col in enumerate(cohort.label_cols):
        scored.insert(2 + i, col, rows[col].to_numpy())
    if "site" in rows.columns:
        scored["site"] = rows["site"].to_numpy()
    meta = {"classes": metas[0].get("classes", []), "loss": metas[0].get("task_state", {}).get("loss")}
    state = metas[0].get("task_state", {})
    if "eval_times" in state:
        meta.update(eval_times=state["eval_times"], tau=min(m["task_state"]["follow_up"] for m in metas))
    metrics = task.evaluate(scored, None, meta, n_boot, seed)
    if "site" in scored.columns:
        metrics["sites"] = site_metrics(task, scored, meta, metrics, n_boot, seed)
    metrics["external"] = {"labels": str(labels), "n_scored": int(len(scored)), "run": str(run.path)}
    metrics["warnings"] = sample_caveats(metrics, task) + list(preds.attrs.get("warnings", []))
    return metrics


def external_name(labels: str | Path, name: str | None = None) -> str:
    """The name of an external cohort in the run report: `name`, checked, or by default the folder its label
    table is in (`cohortB/labels.csv` -> cohortB), made safe as a file name."""
    if name is None:
        folder = Path(labels).expanduser().resolve().parent.name
        return re.sub(r"[^A-Za-z0-9._ -]", "_", folder).strip(" .")[:100] or "external"
    if not is_safe_id(name):
        raise InputError(f"--name {name!r} cannot name a file: use {SAFE_ID_RULE}")
    return name


def record_external(run: str | Path, name: str, metrics: dict, labels: str | Path, predictions: str | Path) -> Path:
    """Keep an external validation in the run (`external/<name>.json`, replacing an earlier one of that name)
    and rebuild its report, whose External validation section lists every recorded cohort."""
    run = RunDir(run)
    path = run.record_external(name, {
        "metrics": metrics, "labels": str(Path(labels).expanduser().resolve()),
        "predictions": str(Path(predictions).expanduser().resolve()), "folds": len(run.finished_folds()),
        "date": datetime.date.today().isoformat()})
    if run.metrics_path.is_file():
        render_report(run)
    return path
