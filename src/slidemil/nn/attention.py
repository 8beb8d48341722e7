"""Attention scorers for attention-based MIL pooling (Ilse et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn


class AttentionScorer(nn.Module):
    """Raw attention logits, one per branch: Ilse 2018 eq. (8) plain or eq. (9) gated.

    plain: a_k = w^T tanh(V h_k); gated: a_k = w^T (tanh(V h_k) * sigmoid(U h_k)).
    Returns [B, N, n_branches]; the softmax over instances is the caller's (it needs the mask).
    """

    def __init__(self, in_dim: int, attn_dim: int, n_branches: int = 1, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = (nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
                  if gated else None)
        self.w = nn.Linear(attn_dim, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.V(h)
        if self.U is not None:
            a = a * self.U(h)
        return self.w(a)


def mlp_embed(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The usual first layer of two-stage WSI MIL: h_k = Dropout(ReLU(W_1 x_k))."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
