"""Save and load a trained fold: `model.safetensors` (weights only, no code) + `model.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slidemil.errors import InputError
from slidemil.models.base import MILModel
from slidemil.models.build import build_model
from slidemil.models.standardize import Scaling, Standardized
from slidemil.utils.io import atomic_path, write_json

# A training strategy wraps the aggregator as `.model`; its own parameters (teachers, projections) serve
# training only, and its forward at inference is the aggregator's.
STRATEGY_PREFIX = "model."


def save_model(folder: Path, model: MILModel, meta: dict, scaling: Scaling | None = None) -> None:
    """`meta` must hold model, model_args, in_dim, n_outputs; anything else is kept for `predict`. The fold's
    input standardisation, if any, is saved beside the weights (`standardize.mean` / `.std`)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if scaling is not None:
        state.update(scaling.tensors())
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(folder / "model.json", meta)


def inference_state(state: dict, meta: dict) -> dict:
    """The aggregator's weights out of a checkpoint (dropping a training strategy's wrapper and the saved
    input standardisation)."""
    state = dict(state)
    Scaling.pop_from(state)
    if not meta.get("strategy"):
        return state
    return {k[len(STRATEGY_PREFIX):]: v for k, v in state.items() if k.startswith(STRATEGY_PREFIX)}


def load_model(folder: Path, device="cpu") -> tuple[MILModel, dict]:
    """The fold's model in eval mode on `device`, and its model.json. A damaged fold is one InputError
    naming the file and what is wrong with it."""
    folder = Path(folder)
    meta_path, weights = folder / "model.json", folder / "model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise InputError(f"{folder}: needs model.json and model.safetensors (is this a finished fold?)")
    redo = f"; retrain this fold (delete {folder} and rerun `slidemil train --resume`)"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc}){redo}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: must hold a JSON object{redo}")
    for key, kind in (("model", str), ("in_dim", int), ("n_outputs", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise InputError(f"{meta_path}: {key!r} is missing or not {kind.__name__} "
                             f"(found {meta.get(key)!r}){redo}")
    try:
        model = build_model(meta, meta["in_dim"], meta["n_outputs"])
    except InputError as exc:
        raise InputError(f"{meta_path}: {exc}") from None
    try:
        state = load_file(str(weights), device=str(torch.device(device)))
    except Exception as exc:  # safetensors raises its own error types for garbage and truncation
        raise InputError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc}){redo}") from None
    scaling = Scaling.pop_from(state)
    try:
        model.load_state_dict(inference_state(state, meta))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{weights}: does not fit the model described in {meta_path.name} ({first}){redo}") from None
    if scaling is not None:
        model = Standardized(model, scaling)
    return model.to(device).eval(), meta
