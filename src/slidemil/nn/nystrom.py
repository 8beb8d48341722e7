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


def _key_scores(q_l: torch.Tensor, k: torch.Tensor, has: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Landmark-to-key scores of one key block: padded keys masked for real landmarks; an empty
    landmark's row is constant (0), so its softmax is uniform over all keys, as when all are masked."""
    scores = q_l @ k.transpose(-1, -2)
    scores = scores.masked_fill(has[:, None] & ~valid[None, :], -torch.finfo(scores.dtype).max)
    return scores.masked_fill(~has[:, None], 0.0)


def _block_lse(q_l, k, has, valid):
    return torch.logsumexp(_key_scores(q_l, k, has, valid), -1)


def _block_attend(q_l, k, v, has, valid, lse):
    return (_key_scores(q_l, k, has, valid) - lse[..., None]).exp() @ v


def _block_row(weights, q_l, k, has, valid, lse):
    return weights @ (_key_scores(q_l, k, has, valid) - lse[..., None]).exp()


def _runner(recompute: bool):
    """Call a block function directly, or under activation checkpointing (inputs kept, the block's
    intermediates recomputed in backward)."""
    if recompute:
        return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)
    return lambda fn, *args: fn(*args)


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
        pinv = iterative_pinv(sim2.softmax(-1), self.pinv_iterations)
        # softmax(Q K~^T) (pinv (softmax(Q~ K^T) V)), associated right to left, and neither [heads, n, m]
        # nor [heads, m, n] is ever formed at large n: softmax(Q~ K^T) V is summed over blocks of keys
        # as exp(scores - logsumexp) V, softmax(Q K~^T) is built a block of queries at a time, and both
        # are recomputed in backward when training. Equal to the one-piece computation up to rounding.
        key_blocks = list(zip(k.split(_QUERY_BLOCK, 2), v.split(_QUERY_BLOCK, 2), valid.split(_QUERY_BLOCK)))
        run = _runner(torch.is_grad_enabled() and len(key_blocks) > 1)
        lse = torch.logsumexp(torch.stack([run(_block_lse, q_l, kb, has, vb_mask)
                                           for kb, _, vb_mask in key_blocks]), 0)          # [1, heads, m]
        attn3_v = sum(run(_block_attend, q_l, kb, vb, has, vb_mask, lse) for kb, vb, vb_mask in key_blocks)
        mixed = pinv @ attn3_v                                                # [1, heads, m, d]
        blocks = q.split(_QUERY_BLOCK, dim=2)
        run = _runner(torch.is_grad_enabled() and len(blocks) > 1)
        parts = [run(_landmark_attend, b, k_l, has, mixed) for b in blocks]
        out = torch.cat(parts, 2) + self.res_conv(v)
        out = out.transpose(1, 2).reshape(1, n + pad, -1)
        out = self.to_out(out)[:, pad:]
        row = None
        if query_row is not None:
            first = _landmark_softmax(q[:, :, pad + query_row:pad + query_row + 1], k_l, has)  # [1, h, 1, m]
            weights = first @ pinv
            run = _runner(torch.is_grad_enabled() and len(key_blocks) > 1)
            row = torch.cat([run(_block_row, weights, q_l, kb, has, vb_mask, lse) for kb, _, vb_mask in key_blocks],
                            -1)[0, :, 0, pad:].sum(0) / self.heads
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
