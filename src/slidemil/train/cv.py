"""Cross-validation run: a run folder (`slidemil.rundir.RunDir`), fold by fold, resumable.

A fold is finished when `fold_<k>/done.json` exists; it is written last, after the weights, history,
test predictions and attention files, so a run killed mid-fold redoes that fold and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from slidemil import __version__
from slidemil.data.bags import BagCache, BagDataset, bag_units
from slidemil.data.cohort import Cohort, attach_features
from slidemil.data.splits import make_splits, read_splits
from slidemil.errors import InputError, SlidemilError
from slidemil.features.encoders import get_spec
from slidemil.features.store import read_attrs, read_features
from slidemil.models.build import SPEC_KEYS, build_model
from slidemil.models.checkpoint import save_model
from slidemil.models.standardize import Scaling
from slidemil.rundir import RunDir
from slidemil.tasks import Task, create_task, evaluate_run
from slidemil.train.baseline import write_baseline
from slidemil.train.config import TrainConfig
from slidemil.train.recipes import paper_settings
from slidemil.train.strategies import apply_strategy
from slidemil.train.trainer import fit, infer
from slidemil.train.tune import tune_fold
from slidemil.utils.config import describe
from slidemil.utils.device import resolve_device
from slidemil.utils.dist import launch_id, leave_process_group, rank_world, wait_for
from slidemil.utils.io import atomic_path, ensure_writable, safe_child, write_csv, write_text
from slidemil.utils.seed import seed_everything

log = logging.getLogger(__name__)

# Feature-file attributes that describe how features were made; copied into model.json for predict.
ENCODER_ATTRS = ("encoder", "encoder_weights", "encoder_sha256", "embedding_dim", "patch_size",
                 "patch_size_level0", "target_mpp", "level0_mpp", "target_magnification", "overlap", "stain_norm",
                 "min_tissue")


def load_cohort(cfg: TrainConfig, task: Task | None = None) -> Cohort:
    cohort = (task or create_task(cfg)).read(cfg.labels)
    return attach_features(cohort, cfg.features, skip_missing=cfg.skip_missing, skip_bad=cfg.skip_bad)


def features_fingerprint(paths) -> str:
    """A cheap identity of the feature files: name, size, and hashes of the first and last 64 KiB."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = os.path.getsize(p)
        h.update(f"{Path(p).name}:{size}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 16))
            fh.seek(max(0, size - (1 << 16)))
            h.update(fh.read())
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def labels_fingerprint(cohort: Cohort) -> str:
    """The identity of what the run learns from: each slide's patient, targets and site, as parsed (so a
    reformatted but equal table keeps it; a flipped label or a moved patient changes it)."""
    cols = ["slide_id", "case_id", *cohort.target_cols, *(c for c in ("site",) if c in cohort.table.columns)]
    rows = cohort.table[cols].sort_values("slide_id").astype(str)
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()


def provenance(cohort: Cohort) -> dict:
    return {"version": __version__, "git_commit": _git_commit(), "torch": str(torch.__version__),
            "python": platform.python_version(), "n_slides": len(cohort.table), "n_patients": cohort.n_patients,
            "classes": cohort.classes,
            "features_sha256": features_fingerprint(cohort.table["feature_path"]),
            "labels_sha256": labels_fingerprint(cohort)}


def _check_same_data(run: RunDir, cohort: Cohort) -> None:
    """A resumed run must see the data its finished folds saw: the label table (as parsed) and the feature
    files are compared with the fingerprints config.yaml recorded, and any change is refused (the pooled
    predictions would mix two truths). A run from before labels were fingerprinted checks the features."""
    recorded = run.config().get("slidemil") or {}
    now = {"labels_sha256": labels_fingerprint(cohort), "features_sha256": features_fingerprint(cohort.table["feature_path"])}
    what = {"labels_sha256": "the label table's slides, patients or targets",
            "features_sha256": "the feature files"}
    changed = [what[k] for k, v in now.items() if recorded.get(k) is not None and recorded[k] != v]
    if changed:
        raise InputError(f"{run.path}: --resume refused: {' and '.join(changed)} changed since the run started "
                         f"(config.yaml records their fingerprints); restore them, or start a new --out")


# how --class-weights balanced weighs the loss, recorded in config.yaml: runs started before the per-bag
# weighting (tasks/classification.py) cannot be resumed with it
CLASS_WEIGHTING = "per-bag"


def _check_run_dir(cfg: TrainConfig, resume: bool) -> RunDir:
    """The run folder, refused when it holds another run (or this one without --resume); creates nothing."""
    run = RunDir(cfg.out)
    if run.has_config():
        if not resume:
            raise InputError(f"{run.path} already holds a run; pass --resume to finish it, or choose another --out")
        old = run.config()
        recorded = old.pop("slidemil", None) or {}
        started_with = recorded.get("arguments")
        # a field the saved config lacks did not exist when the run started: it ran as that field's global
        # default (not a per-model default added since, which would silently change the remaining folds)
        absent = {k: f.get_default(call_default_factory=True) for k, f in TrainConfig.model_fields.items()
                  if k not in old and not f.is_required()}
        try:
            old_cfg = TrainConfig(**{**absent, **old, "out": cfg.out})
        except (ValidationError, TypeError) as exc:
            why = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            raise InputError(f"{run.config_path}: {why}; it was edited since the run started: restore it, or start "
                             f"a new --out") from None
        # with the built arguments on record, the *_args fields compare as built, defaults included
        as_built = set(SPEC_KEYS[1::2]) if started_with is not None else set()
        was, now = old_cfg.identity(), cfg.identity()
        changed = sorted(k for k, v in now.items() if k not in as_built and was.get(k) != v)
        if changed:
            # a per-model default changed by a newer slidemil lands here too (mean_pool's lr did, 2026-12-05)
            diff = ", ".join(f"{k}: the run has {was.get(k)!r}, this call {now[k]!r}" for k in changed)
            raise InputError(f"{run.path}: --resume with a different configuration ({diff}); give the run's "
                             "settings (a default may have changed since it began) or use a new --out")
        _check_built_arguments(run, cfg, started_with or {})
        if cfg.class_weights == "balanced" and recorded.get("class_weighting") != CLASS_WEIGHTING:
            raise InputError(f"{run.path}: its folds were trained by a slidemil whose --class-weights balanced had "
                             f"no effect at one bag a step (its weighted loss was normalised away); the remaining "
                             f"folds would be weighted: start a new --out")
    return run


def _check_built_arguments(run: RunDir, cfg: TrainConfig, started_with: dict) -> None:
    """Refuse to finish a run whose model, re-embedding or strategy would be built with other arguments than
    its first folds were: a flag given differently, or a default that a newer slidemil changed. The message
    names the flags that finish it as it began."""
    now = cfg.resolved_arguments()
    changed = [(field, k, v if isinstance(v, str) else json.dumps(v)) for field, args in started_with.items()
               for k, v in args.items() if now.get(field, {}).get(k, v) != v]
    if changed:
        was = ", ".join(f"{field}.{k}={v}" for field, k, v in changed)
        flags = " ".join(f"--{field.removesuffix('_args')}-arg {k}={v}" for field, k, v in changed)
        raise InputError(f"{run.path}: its folds were trained with {was}, which this run would now build "
                         f"differently; pass {flags} to finish it as it started, or use a new --out")


def _encoder_reference(cohort: Cohort) -> dict:
    """{"encoder": its paper} when the features name a registered encoder (CLAM's or another tool's files
    may name none)."""
    name = encoder_meta(cohort).get("encoder")
    try:
        reference = get_spec(str(name)).reference if name else ""
    except SlidemilError:
        reference = ""
    return {"encoder": reference} if reference else {}


def encoder_meta(cohort: Cohort) -> dict:
    attrs = read_attrs(cohort.table["feature_path"].iloc[0])
    return {k: attrs[k] for k in ENCODER_ATTRS if k in attrs}


def run_cv(cfg: TrainConfig, resume: bool = False, progress=None, on_start=None,
           ranks: tuple[int, int] | None = None) -> Path:
    """Train every fold (skipping finished ones), then write pooled predictions and the evaluation.

    The label table, features and splits are validated before the run folder is created;
    `on_start(run)` is called once it exists (the CLI attaches the run's log file there).
    Under torchrun (`torchrun --nproc_per_node K -m slidemil train ...`) the folds are spread over the
    ranks (rank r trains folds r, r + K, ...; each fold is seeded by its number, so the results are the
    same as in one process); rank 0 owns the run folder: it writes the config and splits, then pools
    and evaluates once every fold's done.json exists. With `--ddp data` all ranks train every fold together
    (the trainer shares each step's bags out and averages the gradients) and only rank 0 writes.
    `ranks=(0, 1)` runs alone whatever the environment says (a benchmark cell, which is itself one rank's
    piece of work)."""
    rank, world = ranks or rank_world()
    if rank > 0:
        return _follow(cfg, progress, rank, world)
    run = _check_run_dir(cfg, resume)
    resolve_device(cfg.device)
    task = create_task(cfg)
    cohort = load_cohort(cfg, task)
    if resume and run.has_config():
        _check_same_data(run, cohort)
    if resume and run.splits_path.exists() or cfg.splits:
        source = run.splits_path if resume and run.splits_path.exists() else cfg.splits
        splits = read_splits(source, cohort)
        cohort = _unassigned_excluded(cohort, splits, str(source))
    else:
        splits = make_splits(cohort, cfg.folds, cfg.val_fraction, cfg.seed, cfg.preserve_site,
                             task.strata(cohort.table, cfg.folds), cfg.cv)
    task.check_splits(splits, cohort.table)
    _check_model_builds(cfg, cohort, task)
    ensure_writable(run.path)
    with run.lock():
        _check_run_dir(cfg, resume)    # again, under the lock: another process may have started meanwhile
        if on_start is not None:
            on_start(run)
        run.clean_temporaries()
        applied = cfg.applied_defaults()
        if applied:
            log.info("%s: %s settings applied (give the flag to change one): %s", cfg.model,
                     "paper recipe" if cfg.recipe == "paper" else "slidemil's measured per-model defaults "
                     "(docs/protocol.md)", ", ".join(f"{k}={v}" for k, v in applied.items()))
        _prepare_run(cfg, run, cohort, splits)
        folds = sorted(int(k) for k in splits["fold"].unique())
        _train_folds(cfg, run, cohort, splits, _rank_folds(cfg, folds, 0, world), progress, task)
        if world > 1 and cfg.ddp == "folds":
            wait_for([run.fold_dir(k) / "done.json" for k in folds], "folds")
        _pool(cfg, run, cohort, splits, task)
        evaluate_run(run, n_boot=cfg.bootstrap, seed=cfg.seed)
    return run.path


def _follow(cfg: TrainConfig, progress, rank: int, world: int) -> Path:
    """A torchrun rank > 0: validate the inputs too, wait for rank 0's config and splits of this launch,
    train this rank's folds; never writes outside its fold folders."""
    task = create_task(cfg)
    cohort = load_cohort(cfg, task)
    run = RunDir(cfg.out)
    wait_for([run.launch_path], "the run folder", poll=1.0, ready=lambda p: p.read_text() == launch_id())
    splits = read_splits(run.splits_path, cohort)
    folds = sorted(int(k) for k in splits["fold"].unique())
    _train_folds(cfg, run, cohort, splits, _rank_folds(cfg, folds, rank, world), progress, task)
    return run.path


def _unassigned_excluded(cohort: Cohort, splits: pd.DataFrame, path: str) -> Cohort:
    """Labelled slides with features that a given splits.csv (or a resumed run's) puts in no fold are neither
    trained nor scored: said in the log and recorded in excluded.csv (and so in the report), not dropped
    silently."""
    unassigned = sorted(set(cohort.table["slide_id"]) - set(splits["slide_id"]))
    if not unassigned:
        return cohort
    log.warning("%s: %d labelled slide(s) with features are in no fold and are left out: %s", path,
                len(unassigned), ", ".join(unassigned[:10]) + (" ..." if len(unassigned) > 10 else ""))
    reasons = {sid: f"in no fold of the splits {path}" for sid in unassigned}
    return cohort.with_table(cohort.table, {**cohort.excluded, **reasons})


def _rank_folds(cfg: TrainConfig, folds: list[int], rank: int, world: int) -> list[int]:
    """The folds this rank trains: folds r, r + K, ... (fold-parallel), or all of them (`--ddp data`)."""
    return folds if cfg.ddp == "data" else folds[rank::world]


def _prepare_run(cfg: TrainConfig, run: RunDir, cohort: Cohort, splits: pd.DataFrame) -> None:
    """The run's splits, excluded slides and config (with provenance); then the launch marker."""
    run.write_splits(splits)
    run.write_excluded(cohort.excluded)
    config = cfg.model_dump()
    config = dict(sorted(config.items(), key=lambda kv: kv[0] not in ("features", "labels", "out")))  # inputs first
    config["slidemil"] = provenance(cohort) | {"arguments": cfg.resolved_arguments(),
                                               "references": cfg.references() | _encoder_reference(cohort)}
    if cfg.class_weights == "balanced":
        config["slidemil"]["class_weighting"] = CLASS_WEIGHTING
    run.write_config(config)
    write_text(run.launch_path, launch_id())


def _train_folds(cfg: TrainConfig, run: RunDir, cohort: Cohort, splits: pd.DataFrame, folds: list[int], progress,
                 task: Task) -> None:
    """Train the given folds that are not finished yet."""
    device = resolve_device(cfg.device)
    enc = encoder_meta(cohort)
    in_dim = _in_dim(cohort)
    # one budget for all folds; on a GPU the bags live there when they fit (--cache-device)
    cache = BagCache.for_run(cfg.cache_gb if cfg.cache_features else 0, device, cfg.cache_device)
    for fold in folds:
        if run.is_fold_done(fold):
            log.info("fold %d already finished: skipped", fold)
            if progress:
                progress({"fold": int(fold), "skipped": True})
            continue
        _train_fold(cfg, cohort, splits[splits["fold"] == fold], int(fold), run, device, in_dim, enc, progress, task,
                    cache)
    leave_process_group()      # --ddp data: every rank is past its last all-reduce before any rank goes on


def _pool(cfg: TrainConfig, run: RunDir, cohort: Cohort, splits: pd.DataFrame, task: Task) -> None:
    """The pooled out-of-fold predictions and the reference baseline on the same folds."""
    pooled = pd.concat([run.fold_predictions(k) for k in sorted(splits["fold"].unique())], ignore_index=True)
    run.write_predictions(pooled)
    write_baseline(run, cohort, splits, task, cfg.bag_unit, cfg.seed, prediction_table)


def _in_dim(cohort: Cohort) -> int:
    """The instances' feature width: the encoder's recorded embedding_dim, else the first bag's columns."""
    return int(encoder_meta(cohort).get("embedding_dim") or read_features(cohort.table["feature_path"].iloc[0]).dim)


def _training_model(cfg: TrainConfig, in_dim: int, n_outputs: int):
    """The aggregator (+ re-embedding) as `cfg` names it, wrapped in its training strategy."""
    return apply_strategy(build_model(cfg.model_dump(), in_dim, n_outputs), cfg.strategy, **cfg.strategy_args)


def _check_model_builds(cfg: TrainConfig, cohort: Cohort, task: Task) -> None:
    """Build the run's model once before anything is written: an argument value it refuses (an even EPEG
    kernel, heads that do not divide a width) is one line naming the flags, not a traceback from fold 0
    after the run folder exists."""
    try:
        _training_model(cfg, _in_dim(cohort), task.n_outputs(cohort))
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:    # torch: "negative dimension -5"
        given = " ".join(f"--{field.removesuffix('_args')}-arg {k}={v}" for field in ("model_args", "reembed_args",
                         "strategy_args") for k, v in getattr(cfg, field).items())
        parts = [f"--model {cfg.model}"] + [f"--{f} {getattr(cfg, f)}" for f in ("reembed", "strategy") if getattr(cfg, f)]
        raise InputError(f"{' '.join(parts)}{' ' + given if given else ''}: {exc}; change that argument "
                         f"(`slidemil models` lists each one's arguments and defaults)") from None


def _datasets(cfg: TrainConfig, cohort: Cohort, fold_splits: pd.DataFrame, fold: int, cache: BagCache,
              device: torch.device | None = None):
    """The fold's train/val/test bags and the input standardisation fitted on its training bags (or None)."""
    role = dict(zip(fold_splits["slide_id"], fold_splits["role"]))
    parts = {}
    for r in ("train", "val", "test"):
        sub = cohort.subset([s for s, v in role.items() if v == r])
        parts[r] = BagDataset(bag_units(sub, cfg.bag_unit),
                              max_instances=cfg.max_instances if r == "train" else None,
                              instance_dropout=cfg.instance_dropout if r == "train" else 0.0,
                              cache=cache, seed=cfg.seed + fold, device=device)
    # training bags only; the covariance (D^2 per row) only when whitening may be used
    fitted = Scaling.fit(parts["train"].raw_bags(), covariance=cfg.standardize in COVARIANCE_MODES or cfg.tune,
                         n_bags=len(parts["train"])) if cfg.standardize != "off" else None
    scaling = choose_scaling(cfg.standardize, fitted, fold, len(parts["train"]))
    for ds in parts.values():
        ds.transform = scaling
    return parts, fitted, scaling


COVARIANCE_MODES = ("whiten", "shrunk")      # the --standardize modes that need the covariance


def choose_scaling(mode: str, fitted: Scaling | None, fold: int, n_bags: int = 0, quiet: bool = False) -> Scaling | None:
    """The input transform `--standardize` asks for from the training bags' statistics: shrunk (the default:
    whitening by the covariance shrunk toward its diagonal), whiten (full ZCA), on (per dimension), auto (per
    dimension when far from unit scale), off. Full whitening rescued attention on features a few directions
    dominate (docs/protocol.md) but moved a heatmap off the tumour on handcrafted colour features, whose
    near-duplicate dimensions it inflates; the shrunk covariance keeps the first and avoids the second."""
    say = (lambda *a: None) if quiet else log.info
    if fitted is None or mode == "off":
        return None
    if mode == "whiten":
        say("fold %d: whitening features (%s; statistics of the %d training bags)", fold, fitted.describe(), n_bags)
        return fitted.whitened()
    if mode == "shrunk":
        say("fold %d: whitening features by their covariance shrunk %.0f%% toward its diagonal (%s; statistics of "
            "the %d training bags)", fold, 100 * fitted.to_diagonal, fitted.describe(), n_bags)
        return fitted.shrunk()
    if mode == "on" or fitted.far_from_unit():
        say("fold %d: standardising features (%s; statistics of the %d training bags)%s", fold, fitted.describe(),
            n_bags, " because they are far from unit scale (--standardize auto)" if mode == "auto" else "")
        return fitted
    say("fold %d: features near unit scale (%s): not standardised (--standardize auto)", fold, fitted.describe())
    return None


def small_validation(cohort: Cohort, fold_splits: pd.DataFrame, fold: int, minimum: int = 10,
                     expected: bool = True) -> list[str]:
    """Warnings when the fold's validation split is too small to choose an epoch reliably: fewer than
    `minimum` patients of a class (or in all, for tasks without classes), or none where one was `expected`
    (given splits without val rows, or a class too small to split)."""
    val_ids = set(fold_splits.loc[fold_splits["role"] == "val", "slide_id"])
    if not val_ids:
        return [f"fold {fold}: no validation split (none in the splits, or a class too small for one), so no epoch "
                f"was selected: the last epoch was kept, as --select last would"] if expected else []
    val = cohort.table[cohort.table["slide_id"].isin(val_ids)]
    if cohort.classes and "y" in val.columns:
        counts = {str(c): int(val.loc[val["y"] == i, "case_id"].nunique()) for i, c in enumerate(cohort.classes)}
    else:
        counts = {"all": int(val["case_id"].nunique())}
    small = {c: n for c, n in counts.items() if n < minimum}
    if not small:
        return []
    text = ", ".join(f"{n} of {c}" if c != "all" else f"{n} in all" for c, n in small.items())
    return [f"fold {fold}: the validation split has only {text} patients (< {minimum}); epoch selection on it is "
            f"noisy - consider --select last or a larger --val-fraction"]


def _train_fold(cfg, cohort, fold_splits, fold, run: RunDir, device, in_dim, enc, progress, task: Task,
                cache: BagCache) -> None:
    gen = seed_everything(cfg.seed + fold)
    parts, fitted, scaling = _datasets(cfg, cohort, fold_splits, fold, cache, device)
    warnings = (small_validation(cohort, fold_splits, fold, expected=cfg.val_fraction > 0 or bool(cfg.splits))
                if cfg.select == "best" else [])
    for text in warnings:
        log.warning(text)
    train_ids = set(fold_splits.loc[fold_splits["role"] == "train", "slide_id"])
    state = task.fit_state(cohort.table[cohort.table["slide_id"].isin(train_ids)])   # never the test fold

    def report(row):
        if progress:
            progress({"fold": fold, **row})

    def train_one(c, generator, shown):
        if c.standardize != cfg.standardize:        # a --tune trial's own input transform
            for ds in parts.values():
                ds.transform = choose_scaling(c.standardize, fitted, fold, quiet=True)
        m = _training_model(c, in_dim, task.n_outputs(cohort))
        return m, fit(m, parts["train"], parts["val"] if len(parts["val"]) else None, c, device, generator, shown,
                      fold=fold, run_dir=run, encoder=enc.get("encoder"), task=task, task_state=state)

    tuned = None
    if cfg.tune:     # each trial from the same seed, so the best trial's model is the fold's model
        if not len(parts["val"]):
            raise InputError(f"--tune selects on each fold's inner validation split, and fold {fold} has none; "
                             f"set --val-fraction above 0 (or give splits with role val)")
        tuned = tune_fold(cfg, lambda c: train_one(c, seed_everything(cfg.seed + fold), None), cfg.tune_trials,
                          cfg.seed + fold)
        model, result = tuned.model, tuned.result
        scaling = choose_scaling(tuned.settings.get("standardize", cfg.standardize), fitted, fold, quiet=True)
        for ds in parts.values():
            ds.transform = scaling
        log.info("fold %d: tuned on its validation split: %s", fold, tuned.settings)
    else:
        model, result = train_one(cfg, gen, report)
    if rank_world()[0] > 0 and cfg.ddp == "data":      # rank 0 holds the same model and writes the fold
        return
    if task.uses_training_predictions:   # e.g. survival: the training risks' median cuts the KM groups
        # whole bags (no --max-instances)
        whole = BagDataset(parts["train"].units, cache=cache, transform=scaling, device=device)
        state = task.after_fit(state, infer(model, whole, device, chunk=cfg.max_instances_infer).logits,
                               whole.labels())
    res = infer(model, parts["test"], device, keep_scores=True, chunk=cfg.max_instances_infer)
    meta = {**{k: getattr(cfg, k) for k in SPEC_KEYS}, "in_dim": in_dim, "n_outputs": task.n_outputs(cohort),
            "task": task.name, "classes": cohort.classes, "bag_unit": cfg.bag_unit, "fold": fold,
            "best_epoch": result.best_epoch, "encoder": enc, "slidemil_version": __version__,
            "standardized": scaling is not None, "warnings": warnings, "recipe": cfg.recipe,
            "built_with": cfg.resolved_arguments(), "applied_defaults": cfg.applied_defaults()}
    if cfg.recipe == "paper":
        meta["recipe_sources"] = paper_settings(cfg.model, cfg.strategy)[1]
    if tuned is not None:
        meta["tuned"] = {"settings": tuned.settings, "trials": len(tuned.table),
                         "validation": float(tuned.table["validation"].max()), "monitor": cfg.monitor}
    if task.name != "classification":
        meta.update(task_options=task.o.model_dump(), task_state=state)
    fold_dir = run.fold_dir(fold)
    save_model(fold_dir, model, meta, scaling)
    write_csv(fold_dir / "history.csv", result.history)
    if tuned is not None:
        write_csv(fold_dir / "tuning.csv", tuned.table)
    preds = prediction_table(res.ids, task.columns(state, res.logits, meta), cohort, cfg.bag_unit)
    preds.insert(2, "fold", fold)
    run.write_predictions(preds, fold)
    if cfg.bag_unit == "slide":
        write_attention(run.attention_dir, parts["test"], res, fold, task.name == "classification")
    run.mark_fold_done(fold, {"fold": fold, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                             "rank": rank_world()[0]})


def prediction_table(ids, columns: dict, cohort: Cohort, bag_unit: str) -> pd.DataFrame:
    """slide_id (or case_id), case_id, the truth (label | time, event | target), then the task's columns
    (prob_<class>..., pred | risk, ... | pred)."""
    table = cohort.table
    if bag_unit == "patient":
        rows = table.drop_duplicates("case_id").set_index("case_id").loc[ids]
        frame = pd.DataFrame({"slide_id": ids, "case_id": ids})
    else:
        rows = table.set_index("slide_id").loc[ids]
        frame = pd.DataFrame({"slide_id": ids, "case_id": rows["case_id"].to_numpy()})
    for col in cohort.label_cols:
        frame[col] = rows[col].to_numpy()
    if "site" in rows.columns:          # per-site metrics (evaluate) read it
        frame["site"] = rows["site"].to_numpy()
    for name, values in columns.items():
        frame[name] = values
    return frame


def write_attention(folder: Path, dataset: BagDataset, res, fold: int, probs: bool = True) -> None:
    """`attention/<slide_id>.h5`: the fold model's instance scores on its test slides, with coords."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (sid, scores) in enumerate(zip(res.ids, res.instance_scores)):
        if scores is None:
            continue
        bag = dataset[i]
        with atomic_path(safe_child(folder, sid, ".h5")) as tmp:
            with h5py.File(tmp, "w") as fh:
                fh.create_dataset("scores", data=scores.astype(np.float32))
                if bag.coords is not None:
                    fh.create_dataset("coords", data=bag.coords.numpy())
                fh.attrs["fold"] = fold
                if probs:
                    fh.attrs["probs"] = res.probs[i]
                else:
                    fh.attrs["outputs"] = res.logits[i]
