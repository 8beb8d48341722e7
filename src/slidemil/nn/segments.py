"""Packed bags: several variable-length bags laid end to end, with a per-token bag id.

PackMIL (Tang et al. 2025, arXiv 2509.20923, "Packing") trains on packs instead of one bag per step,
where every pooling must stay inside its own bag ("without per-slide masking inside a pack, the main
branch silently becomes multi-slide MIL"). The reductions here are those per-bag poolings: a softmax,
sum, mean or max over the tokens of one bag, never across bags. Sequential packing keeps the bags' order
and each bag's tokens together, so the tokens of all packs are the bags concatenated: models that only
pool per bag (attention, mean, max) run on that [T, D] token matrix with no padding at all, and each
per-bag reduction is a reduction over one contiguous run of tokens (split by the bags' sizes: no
scatter, no [T, E] products kept for backward). The packs bound what one pack holds and group PackMIL's
hyperslides.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass
class Segments:
    """Consecutive runs of tokens, one per bag: bag i holds the next `sizes[i]` tokens."""

    sizes: list[int]

    @property
    def n(self) -> int:
        return len(self.sizes)

    @property
    def starts(self) -> list[int]:
        """The token index where each bag begins."""
        return list(accumulate(self.sizes[:-1], initial=0))

    def ids(self, device=None) -> torch.Tensor:
        """[T] the bag of each token."""
        return torch.repeat_interleave(torch.arange(self.n, device=device), torch.tensor(self.sizes, device=device))


@dataclass
class Packed:
    """Bags packed by `pack_bags`: their tokens end to end [T, D], each bag's run (`segments`) and each
    bag's pack (`pack_of`, non-decreasing)."""

    tokens: torch.Tensor
    segments: Segments
    pack_of: list[int]

    @property
    def packs(self) -> Segments:
        """The packs as runs of tokens (PackMIL's hyperslides: each pack one bag)."""
        sizes = [0] * (self.pack_of[-1] + 1)
        for p, n in zip(self.pack_of, self.segments.sizes):
            sizes[p] += n
        return Segments(sizes)


def pack_bags(bags: list[torch.Tensor], pack_len: int, generator: torch.Generator | None = None) -> Packed:
    """Lay `bags` ([n_i, D] each) end to end, in order, into packs of at most `pack_len` tokens (PackMIL's
    "sequential" grouping: a bag goes into the current pack unless it would overflow it, then a new pack
    starts). A bag longer than `pack_len` is cut to a random `pack_len` of its instances (training only: the
    callers never pack at inference)."""
    if pack_len < 1:
        raise ValueError(f"pack_len must be at least 1, not {pack_len}")
    parts = []
    for b in bags:
        if len(b) > pack_len:
            keep = torch.randperm(len(b), generator=generator)[:pack_len].sort().values.to(b.device)
            b = b[keep]
        parts.append(b)
    pack_of, current, used = [], 0, 0
    for i, b in enumerate(parts):
        if i and used + len(b) > pack_len:
            current, used = current + 1, 0
        pack_of.append(current)
        used += len(b)
    return Packed(torch.cat(parts), Segments([len(b) for b in parts]), pack_of)


def segment_softmax(logits: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Softmax of `logits` [T, ...] over the tokens of each bag (trailing axes, e.g. heads, kept apart)."""
    return torch.cat([torch.softmax(part, 0) for part in logits.split(segments.sizes)])


def segment_pool(weights: torch.Tensor, values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """[n, ..., E]: sum_k weights_k values_k over each bag's tokens, weights [T, ...], values [T, E]."""
    return torch.stack([torch.einsum("t...,te->...e", w, v)
                        for w, v in zip(weights.split(segments.sizes), values.split(segments.sizes))])


def segment_mean(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """[n, ...]: the mean of `values` [T, ...] over each bag's tokens."""
    return torch.stack([part.mean(0) for part in values.split(segments.sizes)])


def segment_max(values: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(maxima [n, ...] over each bag's tokens, the token index of each bag's first arg-max, as `max` over
    one bag returns)."""
    tops, firsts, start = [], [], 0
    for part in values.split(segments.sizes):
        top, idx = part.max(0)
        tops.append(top)
        firsts.append(idx + start)
        start += len(part)
    return torch.stack(tops), torch.stack(firsts)
