"""Build an aggregator from its description (the `model*` and `reembed*` fields of a training config
or of a fold's model.json): the registered model, with an optional re-embedding in front of it."""

from __future__ import annotations

from collections.abc import Mapping

from slidemil.models.base import MILModel
from slidemil.models.reembed import REEMBEDDINGS, Reembedded
from slidemil.models.registry import MODELS

SPEC_KEYS = ("model", "model_args", "reembed", "reembed_args", "strategy", "strategy_args")


def build_model(spec: Mapping, in_dim: int, n_outputs: int) -> MILModel:
    """The inference-time model of `spec` (a training strategy, if any, is wrapped on by `slidemil.train`)."""
    model_args = dict(spec.get("model_args") or {})
    if spec.get("reembed"):
        encoder = REEMBEDDINGS.create(spec["reembed"], in_dim, **(spec.get("reembed_args") or {}))
        return Reembedded(encoder, MODELS.create(spec["model"], in_dim=encoder.out_dim, n_outputs=n_outputs,
                                                 **model_args), in_dim)
    return MODELS.create(spec["model"], in_dim=in_dim, n_outputs=n_outputs, **model_args)
