"""DSMIL: Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
Classification with Self-supervised Contrastive Learning", CVPR 2021 (arXiv 2011.08939)."""

from __future__ import annotations

import math

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput, pick_class, pick_class_packed
from slidemil.models.registry import register
from slidemil.nn.masked import full_mask, masked_max, masked_softmax
from slidemil.nn.segments import segment_max, segment_pool, segment_softmax


@register("dsmil", paper="Li et al., CVPR 2021 (arXiv 2011.08939)",
          summary="max-instance stream + attention to the critical instance, two-stream loss")
class DSMIL(MILModel):
    """DSMIL (Li et al., CVPR 2021, Sec. 3.1, dual-stream aggregator). Stream 1: c_i = W_0 h_i, s_max = max_i
    c_i. Critical instance m = argmax_i c_i. Stream 2: q_i = tanh(W_2 ReLU(W_1 h_i)); U_i = softmax_i(<q_i, q_m>
    / sqrt(128)); b = sum_i U_i v_i (v_i = h_i, or Dropout-Linear-ReLU with `passing_v`); bag logits = Conv1d(C,
    C, kernel=D)(b). Loss = 0.5 * L(s_max) + 0.5 * L(s_bag).

    Binary tasks use one stream (the official `--num_classes 1`): logits are [0, s] so the task's
    cross-entropy equals the official BCE. With C > 2 classes there are C streams and the task's
    cross-entropy replaces the official one-hot BCE (our classes are mutually exclusive).
    Weights use the 2024 "stable init" of the official code (orthogonal, zero bias).
    The official code tunes the decision threshold and the epoch on the fold it reports; slidemil
    never does (see the trainer). `instance_scores` are the attention U of the reported class.
    """

    attention_scores = True
    packable = True

    def __init__(self, in_dim: int, n_outputs: int, q_dim: int = 128, passing_v: bool = False,
                 dropout_v: float = 0.0, average: bool = False):
        super().__init__(in_dim, n_outputs)
        self.binary = n_outputs == 2
        c = 1 if self.binary else n_outputs
        self.average = average
        self.instance_classifier = nn.Linear(in_dim, c)
        self.q = nn.Sequential(nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
                  if passing_v else nn.Identity())
        self.fcc = nn.Conv1d(c, c, kernel_size=in_dim)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv1d)):
                nn.init.orthogonal_(mod.weight)
                nn.init.zeros_(mod.bias)

    def _as_logits(self, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(s), s], 1) if self.binary else s

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        c = self.instance_classifier(x)                               # [B, N, C']
        s_max, crit = masked_max(c, mask)                              # [B, C']
        q = self.q(x)                                                  # [B, N, Q]
        q_crit = q.gather(1, crit[..., None].expand(-1, -1, q.shape[-1]))   # [B, C', Q]
        att = (q_crit @ q.transpose(1, 2)) / math.sqrt(q.shape[-1])          # [B, C', N]
        att = masked_softmax(att, mask[:, None])
        bag = att @ self.v(x)                                          # [B, C', D]
        s_bag = self.fcc(bag)[..., 0]                                  # [B, C']
        logits, extras = self._heads(s_max, s_bag, c.transpose(1, 2))
        return MILOutput(logits, pick_class(att, logits), extras)

    def forward_packed(self, x, segments) -> MILOutput:
        """Both streams within each bag of the pack: the critical instance is the bag's own top instance, and the
        attention softmax runs over the bag's tokens."""
        c = self.instance_classifier(x)                               # [T, C']
        s_max, crit = segment_max(c, segments)                         # [n, C'] values and token indices
        q = self.q(x)                                                  # [T, Q]
        q_at = q[crit][segments.ids(q.device)]                         # each token's own bag's critical q: [T, C', Q]
        att = segment_softmax((q_at @ q.unsqueeze(-1))[..., 0] / math.sqrt(q.shape[-1]), segments)   # [T, C']
        bag = segment_pool(att, self.v(x), segments)                   # [n, C', D]
        logits, extras = self._heads(s_max, self.fcc(bag)[..., 0], c)
        return MILOutput(logits, pick_class_packed(att, logits, segments), extras)

    def _heads(self, s_max, s_bag, instance_logits) -> tuple[torch.Tensor, dict]:
        score = (s_bag + s_max) / 2 if self.average else s_bag
        return self._as_logits(score), {"max_logits": self._as_logits(s_max), "bag_logits": self._as_logits(s_bag),
                                        "instance_logits": instance_logits}

    def loss(self, out, target, task_loss):
        return 0.5 * task_loss(out.extras["max_logits"], target) + 0.5 * task_loss(out.extras["bag_logits"], target)
