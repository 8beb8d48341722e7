"""Packed bags: several variable-length bags laid end to end in fixed-length packs, with a per-token bag id.

PackMIL (Tang et al. 2025, arXiv 2509.20923, "Packing") trains on packs instead of one bag per step: a
dense [P, L, D] tensor with no padding waste, where every pooling must stay inside its own bag ("without
per-slide masking inside a pack, the main branch silently becomes multi-slide MIL"). The reductions here
are those per-bag poolings: a softmax, sum, mean or max over the tokens that share a bag id, never across
ids and never over padding (id -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    """Which bag each token of a pack belongs to: `ids` [P, L] int64, -1 at padding; `n` bags in all."""

    ids: torch.Tensor
    n: int

    @property
    def mask(self) -> torch.Tensor:
        """[P, L] True for real tokens."""
        return self.ids >= 0

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions of the real tokens in the flattened [P*L] layout, their bag ids)."""
        ids = self.ids.reshape(-1)
        where = (ids >= 0).nonzero()[:, 0]
        return where, ids[where]

    def counts(self) -> torch.Tensor:
        """[n] tokens per bag."""
        _, ids = self.flat()
        return torch.bincount(ids, minlength=self.n)


@dataclass
class Packed:
    """Packs built by `pack_bags`: x [P, L, D] (zeros at padding) and the token-to-bag `segments`."""

    x: torch.Tensor
    segments: Segments


def pack_bags(bags: list[torch.Tensor], pack_len: int, generator: torch.Generator | None = None) -> Packed:
    """Lay `bags` ([n_i, D] each) end to end, in order, into packs of at most `pack_len` tokens (PackMIL's
    "sequential" grouping: a bag goes into the current pack unless it would overflow it, then a new pack
    starts). A bag longer than `pack_len` is cut to a random `pack_len` of its instances (training only: the
    callers never pack at inference). Packs are padded to the longest one."""
    if pack_len < 1:
        raise ValueError(f"pack_len must be at least 1, not {pack_len}")
    parts = []
    for b in bags:
        if len(b) > pack_len:
            keep = torch.randperm(len(b), generator=generator)[:pack_len].sort().values.to(b.device)
            b = b[keep]
        parts.append(b)
    groups, current, used = [], [], 0
    for i, b in enumerate(parts):
        if current and used + len(b) > pack_len:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += len(b)
    groups.append(current)
    length = max(sum(len(parts[i]) for i in g) for g in groups)
    ref = parts[0]
    x = ref.new_zeros(len(groups), length, ref.shape[1])
    ids = torch.full((len(groups), length), -1, dtype=torch.long, device=ref.device)
    for p, g in enumerate(groups):
        at = 0
        for i in g:
            n = len(parts[i])
            x[p, at:at + n] = parts[i]
            ids[p, at:at + n] = i
            at += n
    return Packed(x, Segments(ids, len(bags)))


def _flatten(values: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the real tokens' values [T, ...], their bag ids [T], their flat positions [T])."""
    where, ids = segments.flat()
    return values.reshape(-1, *values.shape[2:])[where], ids, where


def _unflatten(rows: torch.Tensor, where: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Rows back into the [P, L, ...] layout, zeros at padding."""
    out = rows.new_zeros(segments.ids.numel(), *rows.shape[1:])
    out = out.index_copy(0, where, rows)
    return out.view(*segments.ids.shape, *rows.shape[1:])


def segment_softmax(logits: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Softmax of `logits` [P, L, ...] over the tokens of each bag (trailing axes, e.g. heads, kept apart);
    exactly 0 at padding."""
    vals, ids, where = _flatten(logits, segments)
    shape = (segments.n, *vals.shape[1:])
    index = ids.view(-1, *([1] * (vals.dim() - 1))).expand_as(vals)
    top = vals.new_full(shape, float("-inf")).scatter_reduce(0, index, vals.detach(), "amax", include_self=True)
    e = torch.exp(vals - top.gather(0, index))
    total = vals.new_zeros(shape).index_add(0, ids, e)
    return _unflatten(e / total.gather(0, index), where, segments)


def segment_sum(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """[n, ...]: the sum of `values` [P, L, ...] over each bag's tokens."""
    vals, ids, _ = _flatten(values, segments)
    return vals.new_zeros(segments.n, *vals.shape[1:]).index_add(0, ids, vals)


def segment_mean(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """[n, ...]: the mean of `values` [P, L, ...] over each bag's tokens."""
    counts = segments.counts().clamp_min(1).to(values.dtype)
    return segment_sum(values, segments) / counts.view(-1, *([1] * (values.dim() - 2)))


def segment_max(values: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(maxima [n, ...] over each bag's tokens, the flat [P*L] position of the first token attaining each),
    as `max` over one bag returns its first arg-max."""
    vals, ids, where = _flatten(values, segments)
    index = ids.view(-1, *([1] * (vals.dim() - 1))).expand_as(vals)
    shape = (segments.n, *vals.shape[1:])
    top = vals.new_full(shape, float("-inf")).scatter_reduce(0, index, vals, "amax", include_self=True)
    hit = vals == top.gather(0, index)
    pos = where.view(-1, *([1] * (vals.dim() - 1))).expand_as(vals)
    last = segments.ids.numel()
    first = torch.full(shape, last, dtype=torch.long, device=vals.device).scatter_reduce(
        0, index, torch.where(hit, pos, last), "amin", include_self=True)
    return top, first
