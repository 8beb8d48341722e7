"""Streaming helpers: rows through split pieces, the heap trim, a padded bag's real rows."""

from __future__ import annotations

import torch

from slidemil.nn.blocks import Blocks, recompute
from slidemil.nn.masked import real_rows
from slidemil.utils.memory import release_free_heap


def test_rows_across_pieces_equal_the_slice_and_route_gradients():
    x = torch.randn(1, 23, 3, requires_grad=True)
    blocks = Blocks(x, 5)
    assert blocks.bounds == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for lo, hi in ((0, 5), (3, 12), (4, 23), (20, 23), (7, 8)):
        torch.testing.assert_close(blocks.rows(lo, hi), x[:, lo:hi])
    total = sum((blocks.rows(lo, hi) * (i + 1)).sum() for i, (lo, hi) in enumerate(((0, 7), (5, 23))))
    grad, = torch.autograd.grad(total, x)
    expected = torch.zeros(23)
    expected[0:7] += 1
    expected[5:23] += 2
    torch.testing.assert_close(grad[0, :, 0], expected)


def test_recompute_gives_the_direct_value_and_gradient():
    release_free_heap()  # a no-op where the C library is not glibc
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(6, 4)
    direct, = torch.autograd.grad((x @ w).tanh().sum(), w)
    again, = torch.autograd.grad(recompute(lambda a: (a @ w).tanh().sum(), x), w)
    torch.testing.assert_close(direct, again)


def test_real_rows_is_a_view_when_nothing_is_padded():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert real_rows(x, mask, 0).data_ptr() == x[0].data_ptr()        # no copy for the full bag
    torch.testing.assert_close(real_rows(x, mask, 1), x[1, :2])
