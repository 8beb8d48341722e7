"""R²T-MIL: Tang et al., "Feature Re-Embedding: Towards Foundation Model-Level Performance in
Computational Pathology", CVPR 2024 (arXiv 2402.17228).

`RRTReembed` (projection + R²T encoder) is also a re-embedding module in front of any aggregator
(`slidemil train --reembed rrt`, see `slidemil.models.reembed`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.attention import AttentionScorer, Dropout
from slidemil.nn.blocks import recompute
from slidemil.nn.masked import full_mask, masked_softmax, per_bag
from slidemil.nn.segments import Segments, segment_pool, segment_softmax

# Regions are attended a group at a time so the attention logits stay under this many elements:
# memory is bounded at any N (the official README reports ~10 GB at N = 9000 without it).
_MAX_ATTN_ELEMENTS = 1 << 24


def region_grid(n: int, region_num: int, region_size: int = 0) -> tuple[int, int]:
    """(side, r): the zero-padded square side (a multiple of the region count or size) and the region
    side, as the official `padding` (paper Sec. 3.2)."""
    side = math.ceil(math.sqrt(n))
    if region_size > 0:
        side += -side % region_size
        return side, region_size
    side += -side % region_num
    return side, side // region_num


def to_regions(x: torch.Tensor, side: int, r: int) -> torch.Tensor:
    """[L, C] -> zero-pad to side² -> [regions, r*r, C] (row-major grid in list order, as official)."""
    n, c = x.shape
    x = torch.cat([x, x.new_zeros(side * side - n, c)]) if side * side > n else x
    g = side // r
    return x.view(g, r, g, r, c).permute(0, 2, 1, 3, 4).reshape(g * g, r * r, c)


def from_regions(regions: torch.Tensor, side: int, r: int, n: int) -> torch.Tensor:
    g, c = side // r, regions.shape[-1]
    return regions.view(g, g, r, r, c).permute(0, 2, 1, 3, 4).reshape(side * side, c)[:n]


class InnerAttention(nn.Module):
    """Multi-head self-attention inside each group of tokens ([G, n, C]), with EPEG: the attention-logit
    map (heads as channels) is convolved by a depth-wise (k x 1) Conv2d and added before the softmax."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, epeg_k: int = 0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim)
        self.proj = nn.Linear(heads * self.head_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.pe = (nn.Conv2d(heads, heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=heads)
                   if epeg_k > 0 else None)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        g, n, _ = x.shape
        q, k, v = self.qkv(x).view(g, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)              # [G, heads, n, n]
        if self.pe is not None:
            logits = logits + self.pe(logits)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(g, n, -1)
        return self.drop(self.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, n, _ = x.shape
        step = max(1, _MAX_ATTN_ELEMENTS // (self.heads * n * n))
        if step >= g:
            return self._attend(x)
        stream = self.training and torch.is_grad_enabled()
        parts = [recompute(self._attend, x[i:i + step]) if stream else self._attend(x[i:i + step])
                 for i in range(0, g, step)]
        return torch.cat(parts)


class RegionMSA(nn.Module):
    """R-MSA (paper Sec. 3.2, regional multi-head self-attention): self-attention with EPEG inside each of the
    region_num² regions."""

    def __init__(self, dim, heads, dropout, region_num, region_size, epeg_k):
        super().__init__()
        self.region_num, self.region_size = region_num, region_size
        self.attn = InnerAttention(dim, heads, dropout, epeg_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # [L, C]
        side, r = region_grid(len(x), self.region_num, self.region_size)
        return from_regions(self.attn(to_regions(x, side, r)), side, r, len(x))


class FixedInitLinear(nn.Linear):
    """A Linear whose initialisation is set where it is built; `_xavier` leaves it as it is."""


class CrossRegionMSA(nn.Module):
    """CR-MSA (paper Sec. 3.3, cross-region MSA): per region, k representatives R = softmax_tokens(X phi)^T X;
    self-attention across regions for each representative index (no EPEG, as official); each token gets sum_k
    minmax_tokens(X phi)_k * softmax_k(X phi) * R'_k."""

    def __init__(self, dim, heads, dropout, region_num, region_size, k, mlp):
        super().__init__()
        self.region_num, self.region_size = region_num, region_size
        self.attn = InnerAttention(dim, heads, dropout, epeg_k=0)
        if mlp:
            self.phi = nn.Sequential(nn.Linear(dim, dim // 4, bias=False), nn.Tanh(), nn.Linear(dim // 4, k, bias=False))
        else:
            # the official phi is a (dim x k) Parameter under kaiming_uniform(a=sqrt(5)), whose fan-in is
            # then k: U(-1/sqrt(k), 1/sqrt(k)); the same values here, stored as a Linear
            self.phi = FixedInitLinear(dim, k, bias=False)
            nn.init.uniform_(self.phi.weight, -k ** -0.5, k ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side, r = region_grid(len(x), self.region_num, self.region_size)
        regions = to_regions(x, side, r)                            # [W, P, C]
        logits = self.phi(regions).transpose(1, 2)                  # [W, k, P]
        pool = logits.softmax(-1)                                   # over the region's tokens
        share = logits.softmax(1)                                   # over the k representatives
        lo, hi = logits.amin(-1, keepdim=True), logits.amax(-1, keepdim=True)
        scale = (logits - lo) / (hi - lo + 1e-8)
        reps = pool @ regions                                       # [W, k, C]
        reps = self.attn(reps.transpose(0, 1)).transpose(0, 1)      # attention across the W regions
        out = (scale * share).transpose(1, 2) @ reps                # [W, P, C]
        return from_regions(out, side, r, len(x))


class _PreNormResidual(nn.Module):
    def __init__(self, dim: int, body: nn.Module):
        super().__init__()
        self.norm, self.body = nn.LayerNorm(dim), body

    def forward(self, x):
        return x + self.body(self.norm(x))


class RRTReembed(nn.Module):
    """Projection (Linear E->dim, ReLU, Dropout 0.25) then the R²T encoder: (n_layers - 1) R-MSA layers
    and one CR-MSA layer, each x + MSA(LN(x)) without FFN, optional global shortcut, final LayerNorm.
    Each bag is processed alone (regions come from list order; padded rows never join a region)."""

    packable = True   # `packed` runs each bag of a pack alone

    def __init__(self, in_dim: int, dim: int = 512, dropout: float = 0.25, n_layers: int = 2, heads: int = 8,
                 attn_dropout: float = 0.1, region_num: int = 8, region_size: int = 0, epeg_k: int = 15,
                 crmsa_k: int = 3, crmsa_heads: int = 8, crmsa_mlp: bool = False, all_shortcut: bool = False):
        super().__init__()
        if epeg_k > 0 and epeg_k % 2 == 0:   # the official Conv2d((k, 1), padding k // 2) grows the map by one
            raise ValueError(f"epeg_k must be odd (the EPEG kernel keeps the attention map's size only then), not {epeg_k}")
        self.out_dim = dim
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), Dropout(dropout))
        self.layers = nn.Sequential(*[
            _PreNormResidual(dim, RegionMSA(dim, heads, attn_dropout, region_num, region_size, epeg_k))
            for _ in range(n_layers - 1)])
        self.cr_msa = _PreNormResidual(dim, CrossRegionMSA(dim, crmsa_heads, attn_dropout, region_num,
                                                           region_size, crmsa_k, crmsa_mlp))
        self.all_shortcut = all_shortcut
        self.norm = nn.LayerNorm(dim)
        _xavier(self)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, E] -> [B, N, dim]; padded rows come out as zeros."""
        return per_bag(self._encode, self.project(x), mask)

    def packed(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """[T, E] tokens of packed bags -> [T, dim]: each bag's regions are its own, so its encoder runs on
        its tokens alone, as PackMIL's official packed R²T (`pack_baseline.RRTMIL`, one encoder call per
        image of the pack)."""
        return torch.cat([self._encode(part) for part in self.project(x).split(segments.sizes)])

    def _encode(self, h: torch.Tensor) -> torch.Tensor:
        y = self.cr_msa(self.layers(h))
        return self.norm(y + h if self.all_shortcut else y)


def _xavier(module: nn.Module) -> None:
    """The official `initialize_weights`: Xavier-normal Linear/Conv weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, FixedInitLinear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register("rrt", paper="Tang et al., CVPR 2024 (arXiv 2402.17228)",
          summary="R²T re-embedding (regional MSA with EPEG + cross-region MSA), then ABMIL pooling",
          complexity="O(N²/64) (regional attention; O(N·s²) with region_size)")
class RRTMIL(MILModel):
    """R²T-MIL (Tang et al., CVPR 2024, Sec. 3): x -> RRTReembed -> ABMIL (plain tanh attention, 128) -> Linear.
    Defaults: region_num 8, epeg_k 15, crmsa_k 3, 8 heads, dropout 0.25 / 0.1. Regional attention
    is quadratic within regions (N²/64 with a fixed region count, as the paper); `region_size` makes
    it linear. The regional attention is computed a group of regions at a time (and recomputed in
    backward), a memory bound the official code lacks, with identical results."""

    attention_scores = True
    packable = True

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, dropout: float = 0.25, n_layers: int = 2,
                 heads: int = 8, attn_dropout: float = 0.1, region_num: int = 8, region_size: int = 0,
                 epeg_k: int = 15, crmsa_k: int = 3, crmsa_heads: int = 8, crmsa_mlp: bool = False,
                 all_shortcut: bool = False, attn_dim: int = 128):
        super().__init__(in_dim, n_outputs)
        self.reembed = RRTReembed(in_dim, dim, dropout, n_layers, heads, attn_dropout, region_num, region_size,
                                  epeg_k, crmsa_k, crmsa_heads, crmsa_mlp, all_shortcut)
        self.attention = AttentionScorer(dim, attn_dim, 1, gated=False, w_bias=False)
        self.classifier = nn.Linear(dim, n_outputs)
        _xavier(self.attention)
        _xavier(self.classifier)

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.reembed(x, mask)
        a = masked_softmax(self.attention(h)[..., 0], mask)
        z = (a.unsqueeze(1) @ h)[:, 0]
        return MILOutput(self.classifier(z), a, bag_embedding=z)

    def forward_packed(self, x, segments) -> MILOutput:
        """Each bag's R²T encoder on its own tokens (`RRTReembed.packed`), the attention softmax per bag."""
        h = self.reembed.packed(x, segments)
        a = segment_softmax(self.attention(h)[:, 0], segments)
        z = segment_pool(a, h, segments)
        return MILOutput(self.classifier(z), a, bag_embedding=z)
