"""Nyström self-attention (Xiong et al., AAAI 2021), as used by TransMIL's TransLayer.

softmax(Q K^T) V ~= softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V, with m landmarks Q~, K~
the segment means of Q and K, and pinv by the iterative Moore-Penrose scheme of the paper:
Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))), Z_0 = A^T / (||A||_1 ||A||_inf).
Works on one unpadded sequence [1, n, dim]. Like the official code it pads at the front to a multiple
of m (the pad only shapes the landmark segments and is masked). A sequence no longer than m is
attended exactly: with n <= m landmarks the Nyström formula approximates the very same softmax
attention, at m^3 cost for padding that carries nothing (the official code pads it to m and pays it).

Everything but the landmarks and two sums over keys is token-wise (the residual convolution reaches 16
tokens either side), so the layer runs a block of tokens at a time: softmax(Q~ K^T) V is summed over
key blocks as exp(scores - logsumexp) V with a shared log-sum-exp, softmax(Q K~^T) is built per query
block, and no [heads, n, m] or [heads, m, n] matrix is formed. With `stream=True` (training on large
bags) each block, its pre-norm and its projections included, is also recomputed in backward, so the
layer keeps nothing of size n but its input and output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.nn.blocks import Blocks, recompute, spans

_BLOCK = 8192  # tokens per block


def _landmark_softmax(q: torch.Tensor, k_l: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """softmax(Q K~^T) over the landmarks, empty landmarks masked."""
    return (q @ k_l.transpose(-1, -2)).masked_fill_(~has[None, :], -torch.finfo(q.dtype).max).softmax(-1)


def _key_scores(q_l: torch.Tensor, k: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Landmark-to-key scores of real keys; an empty landmark's row is constant (0): its softmax is
    uniform over every position, the padded ones included (their values are zero)."""
    return (q_l @ k.transpose(-1, -2)).masked_fill(~has[:, None], 0.0)


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
        self.reach = residual_kernel // 2

    def _project(self, x: torch.Tensor, prenorm: nn.Module | None, parts: str = "qkv"):
        """[1, t, dim] -> the named projections among q (scaled), k, v, each [1, heads, t, dim_head]. A
        streamed block asks only for the two it needs: a third less of the work it repeats."""
        x = prenorm(x) if prenorm is not None else x
        weight = self.to_qkv.weight.view(3, -1, x.shape[-1])
        rows = ["qkv".index(p) for p in parts]
        out = F.linear(x, weight[rows].flatten(0, 1) if rows != [0, 1, 2] else self.to_qkv.weight)
        out = [t.view(1, x.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in out.chunk(len(parts), -1)]
        return tuple(t * self.dim_head ** -0.5 if p == "q" else t for p, t in zip(parts, out))

    def forward(self, x: torch.Tensor, query_row: int | None = None, prenorm: nn.Module | None = None,
                stream: bool = False):
        """x [1, n, dim] -> (out [1, n, dim], attention row of token `query_row` [n] or None).

        `prenorm` makes this the pre-norm residual block x + attention(prenorm(x)) (TransLayer), fused so
        that neither prenorm(x) nor the attention output is stored whole. `stream` recomputes each block
        in backward (memory O(block) instead of O(n) beyond the input and output)."""
        n = x.shape[1]
        if n <= self.landmarks:
            out, row = self._exact(*self._project(x, prenorm), query_row)
            return (x + out if prenorm is not None else out), row
        m, heads, d = self.landmarks, self.heads, self.dim_head
        pad = (-n) % m
        seg = (n + pad) // m
        if stream:
            rows = Blocks(x, _BLOCK).rows

            def proj(lo, hi, parts):
                return self._project(rows(lo, hi), prenorm, parts)

            run = recompute
        else:
            q_all, k_all, v_all = self._project(x, prenorm)

            def proj(lo, hi, parts):
                return tuple({"q": q_all, "k": k_all, "v": v_all}[p][:, :, lo:hi] for p in parts)

            def rows(lo, hi):
                return x[:, lo:hi]

            def run(fn, *args):
                return fn(*args)
        blocks = spans(n, _BLOCK)
        segment = torch.div(torch.arange(n, device=x.device) + pad, seg, rounding_mode="floor")
        counts = torch.bincount(segment, minlength=m).to(x.dtype)
        has = counts > 0

        def landmark_sums(lo, hi):
            q, k = proj(lo, hi, "qk")
            zeros = q.new_zeros(1, heads, m, d)
            return zeros.index_add(2, segment[lo:hi], q), zeros.index_add(2, segment[lo:hi], k)

        sums = [run(landmark_sums, lo, hi) for lo, hi in blocks]
        q_l, k_l = (sum(parts) / counts.clamp_min(1)[:, None] for parts in zip(*sums))
        neg = -torch.finfo(x.dtype).max
        sim2 = (q_l @ k_l.transpose(-1, -2)).masked_fill_(~(has[:, None] & has[None, :]), neg)
        pinv = run(iterative_pinv, sim2.softmax(-1), self.pinv_iterations)   # its graph is 36 m x m products

        def key_block(lo, hi):  # one block's log-sum-exp and softmax(Q~ K^T) V under it
            k, v = proj(lo, hi, "kv")
            scores = _key_scores(q_l, k, has)
            lse = scores.logsumexp(-1)
            return lse, (scores - lse[..., None]).exp() @ v

        block_lse, block_v = zip(*(run(key_block, lo, hi) for lo, hi in blocks))
        lse = torch.stack(block_lse).logsumexp(0)                                  # [1, heads, m]
        if pad:  # an empty landmark also spreads over the padded positions (score 0, value 0)
            lse = torch.where(has, lse, torch.logaddexp(lse, lse.new_tensor(math.log(pad))))
        mixed = pinv @ sum((b_lse - lse).exp()[..., None] * b_v for b_lse, b_v in zip(block_lse, block_v))

        def out_block(lo, hi):  # the block's output (+ its input)
            a, b = max(0, lo - self.reach), min(n, hi + self.reach)
            q, v = proj(a, b, "qv")
            att = _landmark_softmax(q[:, :, lo - a:hi - a], k_l, has) @ mixed
            out = (att + self.res_conv(v)[:, :, lo - a:hi - a]).transpose(1, 2).reshape(1, hi - lo, heads * d)
            out = self.to_out(out)
            return out + rows(lo, hi) if prenorm is not None else out

        # The row is its own recomputed piece: were it computed in out_block, a backward that does not
        # reach the row (no loss on it) would leave its recomputed [heads, m, block] tensors held.
        def row_block(lo, hi):  # the query's attention over this block's keys
            scores = _key_scores(q_l, *proj(lo, hi, "k"), has)
            return (weights @ (scores - lse[..., None]).exp())[0, :, 0].sum(0) / heads

        out = torch.cat([run(out_block, lo, hi) for lo, hi in blocks], 1)
        if query_row is None:
            return out, None
        q_row, = proj(query_row, query_row + 1, "q")
        weights = _landmark_softmax(q_row, k_l, has) @ pinv                        # [1, heads, 1, m]
        return out, torch.cat([run(row_block, lo, hi) for lo, hi in blocks])

    def _exact(self, q, k, v, query_row: int | None):
        n = q.shape[2]
        attn = (q @ k.transpose(-1, -2)).softmax(-1)
        out = attn @ v + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(1, n, -1))
        row = attn[0, :, query_row].mean(0) if query_row is not None else None
        return out, row


def square_side(n: int) -> int:
    return math.ceil(math.sqrt(n))
