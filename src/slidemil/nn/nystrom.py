"""Nyström self-attention (Xiong et al., AAAI 2021), as used by TransMIL's TransLayer.

softmax(Q K^T) V ~= softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V, with m landmarks Q~, K~
the segment means of Q and K, and pinv by the iterative Moore-Penrose scheme of the paper:
Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))), Z_0 = A^T / (||A||_1 ||A||_inf).
Works on one unpadded sequence [1, n, dim]; pads at the front to a multiple of m and masks the pad.
A sequence no longer than m is attended exactly: with n <= m landmarks the Nyström formula
approximates the very same softmax attention, at m^3 cost for padding that carries nothing
(the official code pads it to m and pays that cost).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_QUERY_BLOCK = 8192


def _landmark_softmax(q: torch.Tensor, k_l: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """softmax(Q K~^T) over the landmarks, empty landmarks masked."""
    return (q @ k_l.transpose(-1, -2)).masked_fill_(~has[None, :], -torch.finfo(q.dtype).max).softmax(-1)


def _landmark_attend(q, k_l, has, mixed):
    return _landmark_softmax(q, k_l, has) @ mixed


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm = a.abs().sum(-1).amax(-1, keepdim=True) * a.abs().sum(-2).amax(-1, keepdim=True)
    z = a.transpose(-1, -2) / norm.unsqueeze(-1)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dim_head, self.landmarks, self.pinv_iterations = heads, dim_head, landmarks, pinv_iterations
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        # Depth-wise conv over the sequence axis of V: the "residual" value path of TransMIL.
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor, query_row: int | None = None):
        """x [1, n, dim] -> (out [1, n, dim], attention row of token `query_row` [n] or None)."""
        _, n, _ = x.shape
        m = self.landmarks
        if n <= m:
            return self._exact(x, query_row)
        pad = (-n) % m
        x = F.pad(x, (0, 0, pad, 0))
        valid = torch.arange(n + pad, device=x.device) >= pad
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(1, n + pad, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = q * self.dim_head ** -0.5
        seg = (n + pad) // m
        counts = valid.view(m, seg).sum(-1).to(x.dtype)
        has = counts > 0
        q_l = q.reshape(1, self.heads, m, seg, self.dim_head).sum(-2) / counts.clamp_min(1)[:, None]
        k_l = k.reshape(1, self.heads, m, seg, self.dim_head).sum(-2) / counts.clamp_min(1)[:, None]
        neg = -torch.finfo(x.dtype).max
        # in-place fills: matmul's backward does not need the scores. Rows of padded queries are
        # dropped from the output, so only empty landmarks (columns) and padded keys need masking.
        sim2 = (q_l @ k_l.transpose(-1, -2)).masked_fill_(~(has[:, None] & has[None, :]), neg)
        sim3 = (q_l @ k.transpose(-1, -2)).masked_fill_(~(has[:, None] & valid[None, :]), neg)
        pinv = iterative_pinv(sim2.softmax(-1), self.pinv_iterations)
        attn3 = sim3.softmax(-1)
        # softmax(Q K~^T) (pinv (attn3 V)), associated right to left: the [heads, n, m] product
        # softmax(Q K~^T) pinv is never formed, and softmax(Q K~^T) is built a block of queries at a
        # time (recomputed in backward when training), so no [heads, n, m] tensor lives at large n
        mixed = pinv @ (attn3 @ v)                                            # [1, heads, m, d]
        blocks = q.split(_QUERY_BLOCK, dim=2)
        recompute = torch.is_grad_enabled() and len(blocks) > 1
        parts = [checkpoint(_landmark_attend, b, k_l, has, mixed, use_reentrant=False) if recompute
                 else _landmark_attend(b, k_l, has, mixed) for b in blocks]
        out = torch.cat(parts, 2) + self.res_conv(v)
        out = out.transpose(1, 2).reshape(1, n + pad, -1)
        out = self.to_out(out)[:, pad:]
        row = None
        if query_row is not None:
            first = _landmark_softmax(q[:, :, pad + query_row:pad + query_row + 1], k_l, has)  # [1, h, 1, m]
            row = ((first @ pinv) @ attn3)[0, :, 0, pad:].sum(0) / self.heads
        return out, row

    def _exact(self, x: torch.Tensor, query_row: int | None):
        n = x.shape[1]
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(1, n, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        attn = ((q * self.dim_head ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        out = attn @ v + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(1, n, -1))
        row = attn[0, :, query_row].mean(0) if query_row is not None else None
        return out, row


def square_side(n: int) -> int:
    return math.ceil(math.sqrt(n))
