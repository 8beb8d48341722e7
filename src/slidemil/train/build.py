"""Build the trained object from its description (TrainConfig fields or a fold's model.json):
aggregator, optional re-embedding in front of it, optional training strategy around both."""

from __future__ import annotations

from typing import Mapping

from slidemil.models.base import MILModel
from slidemil.models.registry import create
from slidemil.models.reembed import Reembedded, reembedder
from slidemil.train.strategies import apply_strategy

SPEC_KEYS = ("model", "model_args", "reembed", "reembed_args", "strategy", "strategy_args")


def build_model(spec: Mapping, in_dim: int, n_outputs: int) -> MILModel:
    model_args = dict(spec.get("model_args") or {})
    if spec.get("reembed"):
        encoder = reembedder(spec["reembed"], in_dim, **(spec.get("reembed_args") or {}))
        model = Reembedded(encoder, create(spec["model"], encoder.out_dim, n_outputs, **model_args), in_dim)
    else:
        model = create(spec["model"], in_dim, n_outputs, **model_args)
    return apply_strategy(model, spec.get("strategy"), **(spec.get("strategy_args") or {}))
