"""Training strategies that wrap any attention aggregator (`--strategy NAME` on `slidemil train`).

A strategy is a MILModel around another: the same forward (so prediction, heatmaps and checkpoints
work unchanged) and a loss with the strategy's extra terms.
"""

from __future__ import annotations

import torch

from slidemil.models.base import MILModel, MILOutput


class Strategy(MILModel):
    def __init__(self, model: MILModel):
        if not getattr(model, "attention_scores", False):
            raise ValueError(f"{type(model).__name__} does not pool by attention; strategies wrap attention models")
        super().__init__(model.in_dim, model.n_outputs)
        self.model = model

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        return self.model(x, mask, coords)


class AEM(Strategy):
    """AEM (card `aem.md`): L = L_model + lambda * sum_i p_i log p_i over the attention distribution p,
    i.e. minus lambda times its entropy, so that minimising the loss spreads attention. Multi-branch
    attention ([B, K, N]) is averaged over branches. Not normalised by log N, as the official code."""

    def __init__(self, model: MILModel, lamda: float = 0.1):
        super().__init__(model)
        self.lamda = lamda

    def loss(self, out, target, task_loss):
        p = out.extras.get("attention")
        p = p if p is not None else out.instance_scores[:, None]
        neg_entropy = (p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        return self.model.loss(out, target, task_loss) + self.lamda * neg_entropy


STRATEGIES = {"aem": AEM}


def apply_strategy(model: MILModel, name: str | None, **kwargs) -> MILModel:
    if not name:
        return model
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](model, **kwargs)
