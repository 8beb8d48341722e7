"""Selective state-space scan (Mamba's S6) in PyTorch, memory-bounded, with LBMamba's local backward
window; on a GPU its recurrence runs as slidemil's Triton kernel (`nn/triton_scan.py`), or the whole
plain scan as the `mamba-ssm` CUDA kernel when that package is installed.

Gu & Dao, "Mamba" (arXiv 2312.00752), Sec. 3.2 and Algorithm 2 (the selective scan); LBMamba's local
backward scan as in its paper. Layouts follow mamba-ssm: u, delta, z [B, D, L]; A [D, N] (negative);
B, C [B, N, L]; D [D]. Recurrence per channel d and state n:
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = <h_t, C_t> + D u_t,   y *= SiLU(z).
LBMamba (window M > 1) adds, inside each aligned window of M positions, a backward state
    hb_t = exp(delta_t A) hb_{t+1} + delta_t B_t u_t   (reset at the window's right edge)
and uses h_t + hb_t - delta_t B_t u_t in place of h_t.
Packed bags (`segments`): every bag's scan starts from a zero state (a_t = 0 at its first position) and its
windows are aligned to its own start (each bag padded to a multiple of M with delta = 0, which adds nothing
to any state), so one scan over a pack equals scanning each bag alone.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slidemil.nn import triton_scan
from slidemil.nn.blocks import recompute
from slidemil.nn.segments import Segments

try:  # optional CUDA kernel (mamba-ssm); the pure-PyTorch scan below is the reference path
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
except Exception:  # noqa: BLE001 - any import failure (missing package, ABI mismatch) means "not available"
    _cuda_scan = None


def _prepare(delta, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z):
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             window: int = 1) -> torch.Tensor:
    """The recurrence as written, one position at a time (tests only: L Python steps, [B, D, L, N] memory)."""
    delta = _prepare(delta, delta_bias, delta_softplus)
    dA = torch.exp(delta[..., None] * A.float()[:, None])                        # [B, D, L, N]
    dBu = (delta * u.float())[..., None] * B.float().transpose(1, 2)[:, None]    # [B, D, L, N]
    L = u.shape[-1]
    h = torch.zeros_like(dA[:, :, 0])
    hf = []
    for t in range(L):
        h = dA[:, :, t] * h + dBu[:, :, t]
        hf.append(h)
    hs = torch.stack(hf, 2)
    if window > 1:
        hb = [None] * L
        for t in reversed(range(L)):
            nxt = hb[t + 1] if (t + 1) % window and t + 1 < L else torch.zeros_like(h)
            hb[t] = dA[:, :, t] * nxt + dBu[:, :, t]
        hs = hs + torch.stack(hb, 2) - dBu
    y = (hs * C.float().transpose(1, 2)[:, None]).sum(-1)
    return _finish(y, u, D, z)


class _LinearScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t along dim 0 from h_{-1} = h0; returns every h_t. Both passes are plain
    loops of in-place steps outside autograd: the backward is the same recurrence run in reverse,
        g_t = dL/dh_t + a_{t+1} g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t h_{t-1},   dL/dh0 = a_0 g_0,
    so a step costs two small kernels instead of an autograd node per position (the per-node backward
    made a 60-position scan 10x slower than its forward)."""

    @staticmethod
    def forward(ctx, a, b, h0):
        hs = torch.empty_like(b)
        h = h0
        for t in range(b.shape[0]):
            h = torch.addcmul(b[t], a[t], h, out=hs[t])
        ctx.save_for_backward(a, h0, hs)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, h0, hs = ctx.saved_tensors
        g = grad.clone()
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        prev = torch.cat([h0[None].expand_as(hs[:1]), hs[:-1]])
        return g * prev, g, (a[0] * g[0]).sum_to_size(h0.shape)


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Every state of h_t = a_t * h_{t-1} + b_t (dim 0 is time, h_{-1} = h0), differentiable in all three: one
    Triton kernel per direction on a GPU (`nn/triton_scan.py`: the loop below would launch a kernel per
    position there), the in-place loop on a CPU."""
    if triton_scan.usable(b):
        return triton_scan.triton_linear_scan(a, b, h0)
    return _LinearScan.apply(a, b, h0)


def _chunk(delta, u, B, C, reset, A, h0, window: int):
    """One chunk of positions, position-major ([S, Bt, ...]): the forward recurrence on [Bt, D, N] states
    (cache-sized steps), restarted from zero where `reset` [S] (or None) is set, and LBMamba's windowed
    backward state as the same scan over positions within a window, all windows at once, in reverse.
    Returns y [S, Bt, D] and the last state."""
    s = delta.shape[0]
    a = torch.exp(delta[..., None] * A)                                          # [S, Bt, D, N]
    bu = (delta * u)[..., None] * B[:, :, None]                                   # [S, Bt, D, N]
    # a reset cuts the forward recurrence only: the backward window state still reads a_t at a bag's start
    hs = linear_scan(a if reset is None else a.masked_fill(reset[:, None, None, None], 0.0), bu, h0)
    if window > 1:
        pad = -s % window
        # [M, S/M, ...]: position within the window first, reversed (the window's last position first)
        aw, bw = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)).unflatten(0, (-1, window)).transpose(0, 1).flip(0)
                  for t in (a, bu))
        hb = linear_scan(aw, bw, torch.zeros_like(bw[0])).flip(0).transpose(0, 1).flatten(0, 1)[:s]
        out = hs + hb - bu
    else:
        out = hs
    y = (out @ C[..., None])[..., 0]                                              # [S, Bt, D]
    return y, hs[-1].clone()   # a copy: a view would keep this segment's [S, Bt, D, N] states alive in the next


def _aligned(segments: Segments, window: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each bag padded at its end to a multiple of `window`: (the padded position of every real position,
    the padded positions where a bag starts, the padded length)."""
    padded = Segments([n + (-n % window) for n in segments.sizes])
    real = torch.cat([torch.arange(n, device=device) + s for n, s in zip(segments.sizes, padded.starts)])
    return real, torch.tensor(padded.starts, device=device), sum(padded.sizes)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, window: int = 1,
                   chunk: int = 1024, h0: torch.Tensor | None = None, return_state: bool = False,
                   segments: Segments | None = None):
    """y [B, D, L], scanned in chunks of `chunk` positions (rounded up to a multiple of `window`, so windows
    stay aligned) with the state carried between them; in training each chunk is recomputed in backward
    (checkpointing), so memory is O(chunk * D * N) + O(L * D) at any L. Uses mamba-ssm's kernel for the
    plain forward scan on CUDA when it is installed. `h0` / `return_state` carry the state [B, D, N]
    across calls (a caller streaming a long sequence in pieces). `segments` (batch of one, no `h0`): the
    L positions are packed bags, each scanned as if alone (module docstring)."""
    if (_cuda_scan is not None and u.is_cuda and window <= 1 and h0 is None and not return_state
            and segments is None):
        return _cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    delta = _prepare(delta, delta_bias, delta_softplus)
    bt, d, L = u.shape
    w = max(window, 1)
    chunk += -chunk % w   # up, so a caller's whole piece stays one chunk (no recompute)
    scanned = (delta, u, B, C)
    reset = None
    if segments is not None:
        if bt != 1 or h0 is not None:
            raise ValueError("a packed scan takes one sequence of bags, each starting from a zero state")
        real, starts, length = _aligned(segments, w, u.device)
        # float32 buffers: under autocast the projections B, C arrive in bf16 (the scan runs in float32)
        scanned = tuple(t.new_zeros(*t.shape[:-1], length, dtype=torch.float32).index_copy_(-1, real, t.float())
                        for t in scanned)
        reset = torch.zeros(length, dtype=torch.bool, device=u.device).index_fill_(0, starts, True)
    # position-major and contiguous: a permuted view would give a, bu its strides (a position's state
    # scattered L floats apart), making every step of the scan a strided gather
    dl, ul, Bl, Cl = (t.float().permute(2, 0, 1).contiguous() for t in scanned)
    Af = A.float()
    h = torch.zeros(bt, d, A.shape[1], dtype=torch.float32, device=u.device) if h0 is None else h0
    checkpointed = torch.is_grad_enabled() and dl.shape[0] > chunk
    resets = itertools.repeat(None) if reset is None else reset.split(chunk)
    ys = []
    for *pieces, r in zip(*(t.split(chunk) for t in (dl, ul, Bl, Cl)), resets):   # split: one-concat backward
        args = (*pieces, r, Af, h, window)
        y, h = recompute(_chunk, *args) if checkpointed else _chunk(*args)
        ys.append(y)
    y = torch.cat(ys).permute(1, 2, 0)
    if segments is not None:
        y = y[..., real]
    y = _finish(y, u, D, z)
    return (y, h) if return_state else y
