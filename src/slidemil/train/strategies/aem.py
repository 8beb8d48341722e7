"""AEM: Zhang et al., "AEM: Attention Entropy Maximization for Multiple Instance Learning based Whole
Slide Image Classification" (arXiv 2406.15303)."""

from __future__ import annotations

import torch

from slidemil.train.strategies.base import Strategy, register_strategy


@register_strategy("aem", paper="Zhang et al. 2024 (AEM)", summary="attention-entropy regulariser: spreads attention")
class AEM(Strategy):
    """AEM (the paper's total loss, Sec. 3): L = L_model + lambda * sum_i p_i log p_i over the attention distribution p,
    i.e. minus lambda times its entropy, so that minimising the loss spreads attention. Multi-branch
    attention ([B, K, N]) is averaged over branches. Not normalised by log N, as the official code."""

    def __init__(self, model, lamda: float = 0.1):
        super().__init__(model)
        self.lamda = lamda

    def loss(self, out, target, task_loss):
        p = out.extras.get("attention")
        p = p if p is not None else out.instance_scores[:, None]
        neg_entropy = (p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        return self.model.loss(out, target, task_loss) + self.lamda * neg_entropy
