"""ABMILX: Tang et al., "Revisiting End-to-End Learning with Slide-level Supervision in Computational
Pathology", arXiv 2506.02408 (2025): multi-head attention MIL with "attention plus"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.blocks import recompute
from slidemil.nn.masked import full_mask, real_rows


def similarity_pool(q, k, v, chunk: int = 2048):
    """softmax(q k^T / sqrt(d)) v with memory O(chunk * N): one SDPA call for small bags; for large
    ones, query chunks whose N x chunk score blocks are recomputed in backward (checkpointing), since
    CPU attention kernels would otherwise keep the whole N x N matrix (9.5 GB per step at N = 10k)."""
    n = q.shape[-2]
    if n <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    parts = [recompute(F.scaled_dot_product_attention, q[..., i:i + chunk, :], k, v) for i in range(0, n, chunk)]
    return torch.cat(parts, -2)


@register("abmilx", paper="Tang et al., arXiv 2506.02408 (2025)",
          summary="multi-head MLP attention refined by instance-instance similarity (attention plus)",
          complexity="O(H*N^2) compute, O(N*chunk) memory")
class ABMILX(MILModel):
    """ABMILX (Tang et al., arXiv 2506.02408, Sec. 3.2, multi-head attention with attention plus; official
    DAttentionX). x -> Linear(E -> inner) -> GELU -> Dropout(0.25); split into H heads; per-head MLP attention
    A_h = w2^T GELU(W1 x_h) (weights shared across heads); attention plus A+_h = A_h + softmax(Q K^T /
    sqrt(d_h)) V with Q, K = LayerNorm(x_h) W_qk and V = v * A_h (the score vector itself, an easy misreading);
    a_h = softmax_N(A+_h); z = concat_h sum_i a_h,i x_h,i; proj + proj_drop (0); classifier. As the official
    defaults (`mil_bias`, `attn_bias` False): no Linear has a bias except the LayerNorm's, and every Linear is
    Xavier-normal (`initialize_weights`). The optional FFN block and `mil_norm` of the official code are left
    out. Each bag's real instances are processed alone (exact masking); attention plus runs through
    `F.scaled_dot_product_attention` in query chunks with recomputation, so memory stays O(N * 2048) on CPU as
    well (the paper relies on fused GPU kernels for its O(N) memory). `instance_scores` are the head-averaged
    attention."""

    attention_scores = True

    def __init__(self, in_dim: int, n_outputs: int, inner_dim: int = 512, n_heads: int = 8, dropout: float = 0.25,
                 proj_drop: float = 0.0, attn_plus: bool = True):
        super().__init__(in_dim, n_outputs)
        if inner_dim % n_heads:
            raise ValueError("inner_dim must be divisible by n_heads")
        self.h, self.d = n_heads, inner_dim // n_heads
        self.attn_plus = attn_plus
        self.feature = nn.Sequential(nn.Linear(in_dim, inner_dim, bias=False), nn.GELU(), nn.Dropout(dropout))
        self.score = nn.Sequential(nn.Linear(self.d, self.d, bias=False), nn.GELU(), nn.Linear(self.d, 1, bias=False))
        self.norm = nn.LayerNorm(self.d)
        self.qk = nn.Linear(self.d, 2 * self.d, bias=False)
        self.v = nn.Linear(1, 1, bias=False)
        self.proj = nn.Sequential(nn.Linear(inner_dim, inner_dim, bias=False), nn.Dropout(proj_drop))
        self.classifier = nn.Linear(inner_dim, n_outputs, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    def head_scores(self, xh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, A+) for one bag's head features xh [H, N, d]: both [H, N]."""
        a = self.score(xh)[..., 0]
        if not self.attn_plus:
            return a, a
        q, k = self.qk(self.norm(xh)).chunk(2, dim=-1)
        v = self.v(a[..., None])                                   # [H, N, 1]
        return a, a + similarity_pool(q, k, v)[..., 0]

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        pooled, scores = [], torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            f = self.feature(real_rows(x, mask, b))                          # [N, inner]
            xh = f.view(-1, self.h, self.d).transpose(0, 1)          # [H, N, d]
            _, a_plus = self.head_scores(xh)
            att = torch.softmax(a_plus, -1)                          # [H, N]
            pooled.append((att[..., None] * xh).sum(1).reshape(-1))  # heads concatenated
            scores[b, mask[b]] = att.mean(0).to(x.dtype)
        logits = self.classifier(self.proj(torch.stack(pooled)))
        return MILOutput(logits, scores)
