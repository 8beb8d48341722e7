"""Reductions over the instance axis that ignore padded rows (mask True = real instance)."""

from __future__ import annotations

import torch


def full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask, or an all-True one shaped like x's first two axes."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax with padded positions at exactly zero weight. `mask` broadcasts against `logits`."""
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=dim).masked_fill(~mask, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over axis 1 of x [B, N, D] counting real rows only."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the max over `dim` of x [B, N, ...], padded rows never chosen."""
    m = mask.view(*mask.shape, *([1] * (x.dim() - mask.dim())))
    return x.masked_fill(~m, float("-inf")).max(dim=dim)


def real_rows(x: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Bag b's real rows: a view when it has no padding. A boolean index copies the bag, and that copy is
    what a first layer keeps for backward (200 MB at 50k x 1024)."""
    return x[b] if bool(mask[b].all()) else x[b][mask[b]]


def per_bag(fn, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply `fn` ([n, C] -> [n, C']) to each bag's real rows alone and put zeros at padded rows: for
    modules whose output depends on the whole sequence (scans, regions, grids), so padding can never
    enter them. Unpadded batches skip the gather/scatter copies (they matter at N = 50k)."""
    if bool(mask.all()):
        outs = [fn(h[b]) for b in range(len(h))]
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)
    rows = [fn(real_rows(h, mask, b)) for b in range(len(h))]
    out = rows[0].new_zeros(*mask.shape, rows[0].shape[-1])
    for b, r in enumerate(rows):
        out[b, mask[b]] = r
    return out
