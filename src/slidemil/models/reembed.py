"""Re-embedding modules placed between the patch features and any aggregator (`--reembed NAME`).

A re-embedder maps [B, N, E] (with the mask) to [B, N, out_dim]; the aggregator is built for
out_dim. R²T's authors use it this way ("put the rrt_enc before the aggregation module").
"""

from __future__ import annotations

from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import constructor_arguments
from slidemil.models.rrt import RRTReembed
from slidemil.nn.masked import full_mask

REEMBEDDERS: dict[str, type[nn.Module]] = {"rrt": RRTReembed}


class Reembedded(MILModel):
    """An aggregator behind a re-embedder: same outputs, instance scores and loss as the aggregator."""

    def __init__(self, encoder: nn.Module, model: MILModel, in_dim: int):
        super().__init__(in_dim, model.n_outputs)
        self.encoder, self.model = encoder, model
        self.attention_scores = model.attention_scores

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        return self.model(self.encoder(x, mask), mask, coords)

    def loss(self, out, target, task_loss):
        return self.model.loss(out, target, task_loss)


def reembedder(name: str, in_dim: int, **kwargs) -> nn.Module:
    if name not in REEMBEDDERS:
        raise ValueError(f"unknown re-embedding {name!r}; choose one of {', '.join(sorted(REEMBEDDERS))}")
    cls = REEMBEDDERS[name]
    allowed = list(constructor_arguments(cls, ("self", "in_dim")))
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"re-embedding {name!r} takes no argument(s) {', '.join(unknown)}; "
                         f"its arguments are: {', '.join(allowed)}")
    return cls(in_dim, **kwargs)
