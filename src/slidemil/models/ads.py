"""PackMIL's attention-driven downsampler (ADS): Tang, Fang, Wu, Li & Cheng, "Revisiting Data Challenges of
Computational Pathology: A Pack-based Multiple Instance Learning Framework", arXiv 2509.20923 (2025), card
`packmil.md` Algorithm step 2; official `modules/pack/ads.py` (`ADS`, `DimensionDrop`, type "random").

A re-embedding (`--reembed ads`) in front of the aggregator, so the saved model carries it to `predict` and
`heatmap`. Every forward re-weights the bag's tokens by an attention shortcut,
    x <- x + softmax_N(w_2^T tanh(W_1 x)) * x,
then maps each token through embed (Linear D->D, GELU) and a Linear D->D. In PackMIL training (`reduce`)
the tokens of a bag part are shuffled, zero-padded to a multiple of r after the shortcut, embedded, and
each group of r consecutive tokens becomes one token: the r embeddings concatenated (dimension-major, as
the official permute) to r*D values, a random D of them kept (one draw for the whole part, unscaled: the
official DimensionDrop with p = 1 - 1/r), then the Linear D->D. A part of N tokens leaves as ceil(N/r).
"""

from __future__ import annotations

import torch
from torch import nn

from slidemil.nn.masked import full_mask, masked_softmax
from slidemil.nn.segments import Segments, segment_softmax


class ADS(nn.Module):
    """[B, N, D] -> [B, N, D] token-wise (inference and short parts); `reduce` downsamples one part by r."""

    packable = True   # `packed` keeps the attention softmax inside each bag of a pack

    def __init__(self, in_dim: int, r: int = 4, attn_dim: int = 128):
        super().__init__()
        if r < 2:
            raise ValueError(f"ads r (the downsampling rate) must be at least 2, not {r}")
        self.r, self.out_dim = r, in_dim
        self.attention = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.embed = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU())
        self.downsample = nn.Linear(in_dim, in_dim)
        for m in self.modules():   # PackMIL's `initialize_weights`: Xavier-normal weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._token_map(x, masked_softmax(self._scores(x), full_mask(x, mask)))

    def packed(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """[T, D] tokens of packed bags: the forward with each bag's softmax over its own tokens."""
        return self._token_map(x, segment_softmax(self._scores(x), segments))

    def reduce(self, part: torch.Tensor) -> torch.Tensor:
        """One bag part [N, D] -> [ceil(N / r), D] (training): shortcut, pad, shuffle, embed, group r tokens,
        keep a random D of their r * D values, Linear."""
        n, d = part.shape
        x = _shortcut(part, torch.softmax(self._scores(part), 0))
        x = torch.cat([x, x.new_zeros(-n % self.r, d)])
        x = self.embed(x[torch.randperm(len(x), device=x.device)])
        grouped = x.view(-1, self.r, d).transpose(1, 2).reshape(-1, d * self.r)     # [N / r, D * r], D-major
        keep = torch.randperm(d * self.r, device=x.device)[:d].sort().values
        return self.downsample(grouped[:, keep])

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)[..., 0]

    def _token_map(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.embed(_shortcut(x, weights)))


def _shortcut(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x + softmax-weights * x: the attention shortcut every ADS path starts with."""
    return x + weights[..., None] * x
