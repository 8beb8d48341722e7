"""Attention scorers for attention-based MIL pooling (Ilse et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn


class AttentionScorer(nn.Module):
    """Raw attention logits, one per branch: Ilse 2018 eq. (8) plain or eq. (9) gated.

    plain: a_k = w^T tanh(V h_k); gated: a_k = w^T (tanh(V h_k) * sigmoid(U h_k)).
    Returns [B, N, n_branches]; the softmax over instances is the caller's (it needs the mask).

    V and U are one fused Linear (one matmul instead of two: the same arithmetic, less overhead).
    """

    def __init__(self, in_dim: int, attn_dim: int, n_branches: int = 1, gated: bool = True, dropout: float = 0.0,
                 w_bias: bool = True):
        super().__init__()
        self.gated = gated
        self.VU = nn.Linear(in_dim, attn_dim * (2 if gated else 1))
        self.drop = Dropout(dropout) if dropout > 0 else nn.Identity()
        # w's bias shifts every logit of a branch equally, which a softmax over instances ignores:
        # models written after ABMIL's checkpoints existed leave it out (it could never learn)
        self.w = nn.Linear(attn_dim, n_branches, bias=w_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            v, u = self.VU(h).chunk(2, dim=-1)
            a = self.drop(torch.tanh(v)) * self.drop(torch.sigmoid(u))
        else:
            a = self.drop(torch.tanh(self.VU(h)))
        return self.w(a)


def mlp_embed(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The usual first layer of two-stage WSI MIL: h_k = Dropout(ReLU(W_1 x_k))."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), Dropout(dropout))


class Dropout(nn.Dropout):
    """nn.Dropout with a faster CPU mask: 16 random bits per element drawn four at a time from one
    64-bit integer (torch's CPU Bernoulli costs more than the 10k x 512 matmul before it). The keep
    probability is quantised to 1/65536; on GPU it defers to torch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_cuda:
            return super().forward(x)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        threshold = int(round(self.p * 65536)) - 32768  # int16 view: uniform on [-32768, 32767]
        dropped = (bits.view(torch.int16)[:n] < threshold).view_as(x)
        return x.masked_fill(dropped, 0.0) * (1.0 / (1.0 - self.p))
