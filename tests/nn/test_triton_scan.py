"""The Triton kernel of the scan's recurrence (nn/triton_scan.py) equals the reference loop in values and
gradients. CI has no GPU: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, the same kernel code
executed on the CPU), in a child process since the variable must be set before Triton is imported.
tests/gpu checks the compiled kernels on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")   # ships with torch's CUDA builds, which `make install` takes

SCRIPT = textwrap.dedent("""
    import torch
    from slidemil.nn import triton_scan
    from slidemil.nn.segments import Segments
    from slidemil.nn.ssm import _LinearScan, linear_scan, selective_scan, selective_scan_reference

    def grads(fn, leaves):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(*leaves)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [t.grad for t in leaves]

    torch.manual_seed(0)
    assert triton_scan.usable(torch.zeros(1))
    # the recurrence alone: channels not a multiple of the block, a broadcast initial state, one step
    for shape, h0 in [((7, 3, 5), (3, 5)), ((70, 2, 9, 4), (2, 9, 4)), ((33, 130), (130,)), ((20, 3, 4), (1, 4)),
                      ((1, 8), (8,))]:
        leaves = [torch.rand(shape), torch.randn(shape), torch.randn(h0)]
        y1, g1 = grads(triton_scan.triton_linear_scan, leaves)
        y0, g0 = grads(_LinearScan.apply, leaves)
        torch.testing.assert_close(y1, y0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b)
    assert linear_scan.__module__ == "slidemil.nn.ssm"
    # the selective scan through it: Mamba's plain scan, LBMamba's windows, chunks carried over, packed bags
    b, d, n, L = 1, 6, 4, 45
    args = [torch.randn(b, d, L), torch.randn(b, d, L) * 0.5, -torch.rand(d, n) - 0.1, torch.randn(b, n, L),
            torch.randn(b, n, L), torch.randn(d), torch.randn(b, d, L)]
    for window in (1, 4):
        ref = lambda *t: selective_scan_reference(*t[:5], D=t[5], z=t[6], delta_softplus=True, window=window)
        new = lambda *t: selective_scan(*t[:5], D=t[5], z=t[6], delta_softplus=True, window=window, chunk=16)
        y1, g1 = grads(new, args)
        y0, g0 = grads(ref, args)
        torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)
        for a, c in zip(g1, g0):
            torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)
        sizes = [13, 20, 12]
        packed = selective_scan(*args[:5], D=args[5], z=args[6], delta_softplus=True, window=window,
                                segments=Segments(sizes))
        alone = [selective_scan_reference(*(t[..., s:s + k] for t in args[:2]), args[2],
                                          *(t[..., s:s + k] for t in args[3:5]), D=args[5], z=args[6][..., s:s + k],
                                          delta_softplus=True, window=window)
                 for s, k in zip((0, 13, 33), sizes)]
        torch.testing.assert_close(packed, torch.cat(alone, -1), rtol=1e-4, atol=1e-4)
    print("triton scan ok")
""")


def test_triton_kernel_equals_the_reference_scan_in_values_and_gradients():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "triton scan ok" in proc.stdout, proc.stderr[-3000:]
