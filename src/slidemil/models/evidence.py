"""Evidence attention: attention that cannot be pointed at negative evidence (slidemil's own model).

Why attention pooling fails the standard-MIL assumption (Raff & Holt 2023): in ABMIL the attention
weight a_k and the value pooled (h_k) are separate functions of an instance, so a "poison" instance
that only ever occurs in negative bags can take a large weight and a value that drags the bag logit
down. The model then learns "poison absent => positive", which the standard MIL assumption forbids.

Here the attention weight is a function of the instance's own positive evidence:
    s_k = f(x_k)                     (instance evidence logit, an MLP)
    a_k = softmax_k(beta * s_k)      (attend where the evidence is)
    z   = sum_k a_k s_k              (bag logit: a soft maximum of the evidence)
Adding an instance p to a bag changes z by z' - z = a_p (s_p - z). An instance with low evidence
(s_p < z) also has a small weight a_p <= exp(beta (s_p - z)), so it can lower z by at most
max_d d e^{-beta d} = 1 / (e beta): a bounded amount, independent of how the model scores it. A bag
cannot be argued negative by one negative-only instance, while any instance with strong evidence
raises z as in mi-Net. Unlike max pooling, gradients reach every high-evidence instance, so it trains
like attention. beta is learnable and kept at or above `beta_min` (beta = beta_min + softplus(r),
initialised at `beta`): the bound 1 / (e beta) <= 1 / (e beta_min) holds whatever training does (beta
near 0 would make the pooling a mean, where one instance can pull z down without limit). Binary tasks
return logits [0, z]; C > 2 classes get one evidence head and one pooling per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.models.base import MILModel, MILOutput, pick_class
from slidemil.models.registry import register
from slidemil.nn.attention import mlp_embed
from slidemil.nn.masked import full_mask, masked_softmax


@register("evidence_attn", paper="slidemil (this library); motivated by Raff & Holt, NeurIPS 2023",
          summary="attention weights from each instance's own positive evidence; bounded negative evidence")
class EvidenceAttention(MILModel):
    attention_scores = True

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25, beta: float = 1.0,
                 beta_min: float = 0.25):
        super().__init__(in_dim, n_outputs)
        if not beta > beta_min > 0:
            raise ValueError(f"evidence_attn needs beta > beta_min > 0 (got beta={beta}, beta_min={beta_min})")
        self.beta_min = beta_min
        self.binary = n_outputs == 2
        self.evidence = nn.Sequential(mlp_embed(in_dim, hidden_dim, dropout),
                                      nn.Linear(hidden_dim, 1 if self.binary else n_outputs))
        # softplus^-1(beta - beta_min), so that beta starts where asked and never falls below beta_min
        self.beta_raw = nn.Parameter(torch.tensor(float(beta - beta_min)).expm1().log())

    @property
    def beta(self) -> torch.Tensor:
        return self.beta_min + F.softplus(self.beta_raw)

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        s = self.evidence(x).transpose(1, 2)                     # [B, C', N]
        a = masked_softmax(self.beta * s, mask[:, None])
        z = (a * s.masked_fill(~mask[:, None], 0.0)).sum(-1)      # [B, C']
        logits = torch.cat([torch.zeros_like(z), z], 1) if self.binary else z
        return MILOutput(logits, pick_class(a, logits),
                         {"instance_logits": s.masked_fill(~mask[:, None], 0.0), "attention": a})
