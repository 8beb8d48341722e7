"""Rows of a long sequence in fixed blocks, for layers that stream a large bag a block at a time, each
block recomputed in backward."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from slidemil.utils.memory import release_free_heap


def recompute(fn, *args):
    """fn(*args) under activation checkpointing: only the inputs are kept, the block is run again in
    backward, and the heap is trimmed as it starts (in forward and in the recomputation). Non-re-entrant:
    it works with torch.autograd.grad and needs no grad-requiring input. (A scan used to need the
    re-entrant variant: an autograd node per position kept ~20 MB of placeholders per piece; the scan is
    one node now, `ssm.linear_scan`.)"""
    def trimmed(*a):
        release_free_heap()
        return fn(*a)

    return checkpoint(trimmed, *args, use_reentrant=False)


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of `size` over n rows, the last one shorter."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


class Blocks:
    """x [1, n, ...] split once along dim 1 into views of `size` rows. Rows taken through these pieces
    (rather than sliced from x) get gradients of block size in backward: every slice of x would get a
    gradient as large as all of x, zero-filled, and one more full-size addition."""

    def __init__(self, x: torch.Tensor, size: int):
        self.size = size
        self.pieces = x.split(size, 1)
        self.bounds = spans(x.shape[1], size)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1, which may span neighbouring pieces (a halo)."""
        parts = []
        for j in range(lo // self.size, (hi - 1) // self.size + 1):
            start, end = self.bounds[j]
            a, b = max(lo, start) - start, min(hi, end) - start
            parts.append(self.pieces[j] if (a, b) == (0, end - start) else self.pieces[j][:, a:b])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
