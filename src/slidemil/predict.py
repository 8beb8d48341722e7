"""`slidemil predict`: apply every fold of a run to a new cohort's features and average the folds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.data.bags import BagDataset
from slidemil.errors import InputError, MissingFeaturesError
from slidemil.features.store import check_feature_file, find_feature_file, read_attrs
from slidemil.rundir import RunDir
from slidemil.train.trainer import infer
from slidemil.utils.device import resolve_device

log = logging.getLogger(__name__)


def check_compatible(meta: dict, attrs: dict, path: Path) -> None:
    """The features must come from the encoder and dimension the model was trained on."""
    dim = attrs.get("embedding_dim")
    if dim is not None and int(dim) != int(meta["in_dim"]):
        raise InputError(f"{path}: features are {dim}-d but the model was trained on {meta['in_dim']}-d "
                         f"features ({meta.get('encoder', {}).get('encoder', 'unknown encoder')}); "
                         "extract them with the run's encoder")
    want, have = meta.get("encoder", {}).get("encoder"), attrs.get("encoder")
    if want and have and str(want) != str(have):
        raise InputError(f"{path}: features were made by encoder {have!r} but the model expects {want!r}; "
                         "extract them with the run's encoder")


def predict(run: str | Path, feature_dir: str | Path, slide_ids: list[str] | None = None, device: str = "auto",
            skip_missing: bool = False) -> pd.DataFrame:
    """One row per slide: slide_id, prob_<class> (fold mean), pred, and fold<k>_prob_<class>."""
    run, feature_dir = RunDir(run), Path(feature_dir)
    dev = resolve_device(device)
    if slide_ids is None:
        files = sorted(p for p in feature_dir.iterdir() if p.suffix in (".h5", ".pt"))
        if not files and (feature_dir / "pt_files").is_dir():
            files = sorted((feature_dir / "pt_files").glob("*.pt"))
        slide_ids = [p.stem for p in files]
    if not slide_ids:
        raise InputError(f"{feature_dir} holds no feature files (.h5 or .pt)")
    paths, missing = {}, {}
    for sid in slide_ids:
        p = find_feature_file(feature_dir, sid)
        if p is None:
            missing[sid] = f"no feature file under {feature_dir}"
        elif (problem := check_feature_file(p)[1]) is not None:
            missing[sid] = f"{p}: {problem}"
        else:
            paths[sid] = p
    if missing and not skip_missing:
        raise MissingFeaturesError(missing)
    if not paths:
        raise InputError(f"{feature_dir}: no slide has usable features")
    models = run.fold_models(dev)
    meta = models[0][1]
    for p in paths.values():
        check_compatible(meta, read_attrs(p), p)
    classes = meta["classes"]
    units = [(sid, [str(p)], 0) for sid, p in paths.items()]
    dataset = BagDataset(units, cache=len(models) > 1)
    frame = pd.DataFrame({"slide_id": list(paths)})
    per_fold = []
    for model, m in models:
        res = infer(model, dataset, dev)
        per_fold.append(res.probs)
        for c, name in enumerate(classes):
            frame[f"fold{m['fold']}_prob_{name}"] = res.probs[:, c]
    mean = np.mean(per_fold, axis=0)
    for c, name in enumerate(classes):
        frame.insert(1 + c, f"prob_{name}", mean[:, c])
    frame.insert(1 + len(classes), "pred", [classes[i] for i in mean.argmax(1)])
    return frame
