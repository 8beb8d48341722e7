"""The linear recurrence at the heart of the selective scan, h_t = a_t * h_{t-1} + b_t, as one Triton kernel
per direction on a GPU.

`ssm.linear_scan` runs it as a Python loop of one small kernel per position: on a CPU that costs little
(each step is real work), on a GPU every position is a kernel launch, so a 50k-instance Mamba layer made
~10^5 launches a step (issue 27: the Mamba models did not finish one benchmark configuration in 150 s).
Here each program owns BLOCK channels (the flattened [Bt, D, N] state) and walks the positions in a loop
inside the kernel; the backward is the reverse recurrence of `ssm._LinearScan` in a second kernel:
    g_t = dL/dh_t + a_{t+1} g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t h_{t-1},   dL/dh0 = a_0 g_0.
Used automatically for CUDA tensors when Triton imports (`usable`); the Python loop stays the reference
(tests/nn/test_triton_scan.py checks values and gradients against it in Triton's interpreter on the CPU,
tests/gpu on a GPU). Float32 throughout, as the rest of the scan.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable

BLOCK = 64   # channels per program: Bt * D * N is ~10^3-10^4, so 16-160 programs walk the positions in parallel


def usable(t: torch.Tensor) -> bool:
    """True when the kernel can run on `t`: Triton is installed (it ships with torch's CUDA builds) and `t` is
    on a GPU (or Triton's interpreter is on, TRITON_INTERPRET=1, which runs the same kernels on the CPU, for
    tests). Triton itself is imported only then: it costs 70 MB of memory and a second of start-up."""
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _installed()


@functools.cache
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    """(forward, backward) kernels, compiled by Triton on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(a_ptr, b_ptr, h0_ptr, hs_ptr, steps, channels, BLOCK: tl.constexpr):
        offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)    # int64: t * channels + offs
        live = offs < channels
        h = tl.load(h0_ptr + offs, mask=live, other=0.0)
        for t in range(steps):
            row = t * channels
            a = tl.load(a_ptr + row + offs, mask=live, other=0.0)
            b = tl.load(b_ptr + row + offs, mask=live, other=0.0)
            h = a * h + b
            tl.store(hs_ptr + row + offs, h, mask=live)

    @triton.jit
    def backward_kernel(a_ptr, h0_ptr, hs_ptr, g_ptr, da_ptr, db_ptr, dh0_ptr, steps, channels, BLOCK: tl.constexpr):
        offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        live = offs < channels
        h0 = tl.load(h0_ptr + offs, mask=live, other=0.0)
        carry = tl.zeros([BLOCK], dtype=tl.float32)          # a_{t+1} g_{t+1}
        for i in range(steps):
            t = steps - 1 - i
            row = t * channels
            g = tl.load(g_ptr + row + offs, mask=live, other=0.0) + carry
            tl.store(db_ptr + row + offs, g, mask=live)
            prev = tl.load(hs_ptr + row - channels + offs, mask=live & (t > 0), other=0.0)
            prev = tl.where(t > 0, prev, h0)
            tl.store(da_ptr + row + offs, g * prev, mask=live)
            carry = tl.load(a_ptr + row + offs, mask=live, other=0.0) * g
        tl.store(dh0_ptr + offs, carry, mask=live)

    return forward_kernel, backward_kernel


def _grid(channels: int) -> tuple[int]:
    return ((channels + BLOCK - 1) // BLOCK,)


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        a, b = a.float().contiguous(), b.float().contiguous()
        h0_full = h0.float().expand(b.shape[1:]).contiguous()
        steps, channels = b.shape[0], h0_full.numel()
        hs = torch.empty_like(b)
        if steps:
            _kernels()[0][_grid(channels)](a, b, h0_full, hs, steps, channels, BLOCK=BLOCK)
        ctx.save_for_backward(a, h0_full, hs)
        ctx.h0_shape = h0.shape
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, h0, hs = ctx.saved_tensors
        grad = grad.float().contiguous()
        steps, channels = hs.shape[0], h0.numel()
        da, db, dh0 = torch.empty_like(hs), torch.empty_like(hs), torch.zeros_like(h0)
        if steps:
            _kernels()[1][_grid(channels)](a, h0, hs, grad, da, db, dh0, steps, channels, BLOCK=BLOCK)
        return da, db, dh0.sum_to_size(ctx.h0_shape)


def triton_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Every state of h_t = a_t * h_{t-1} + b_t (dim 0 is time, h_{-1} = h0, broadcast to b[0]'s shape),
    differentiable in all three; the kernels above."""
    return _TritonScan.apply(a, b, h0)
