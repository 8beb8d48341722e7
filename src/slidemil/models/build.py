"""Build an aggregator from its description (the `model*` and `reembed*` fields of a training config
or of a fold's model.json, whose `built_with` records every argument): the registered model, with an optional
re-embedding in front of it."""

from __future__ import annotations

from collections.abc import Mapping

from slidemil.models.base import MILModel
from slidemil.models.reembed import REEMBEDDINGS, Reembedded
from slidemil.models.registry import MODELS

SPEC_KEYS = ("model", "model_args", "reembed", "reembed_args", "strategy", "strategy_args")


def _arguments(spec: Mapping, field: str, registry) -> dict:
    """The arguments given, over those the fold was built with (`built_with` in model.json, defaults
    included), so a fold loads as it was trained even after a default changed; arguments this version no
    longer has are dropped."""
    built = (spec.get("built_with") or {}).get(f"{field}_args") or {}
    known = registry.info(spec[field]).arguments()
    return {**{k: v for k, v in built.items() if k in known}, **(spec.get(f"{field}_args") or {})}


def build_model(spec: Mapping, in_dim: int, n_outputs: int) -> MILModel:
    """The inference-time model of `spec` (a training strategy, if any, is wrapped on by `slidemil.train`)."""
    model_args = _arguments(spec, "model", MODELS)
    if spec.get("reembed"):
        encoder = REEMBEDDINGS.create(spec["reembed"], in_dim, **_arguments(spec, "reembed", REEMBEDDINGS))
        return Reembedded(encoder, MODELS.create(spec["model"], in_dim=encoder.out_dim, n_outputs=n_outputs,
                                                 **model_args), in_dim)
    return MODELS.create(spec["model"], in_dim=in_dim, n_outputs=n_outputs, **model_args)
