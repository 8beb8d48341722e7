"""TransMIL: Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole
Slide Image Classification", NeurIPS 2021 (arXiv 2106.00908)."""

from __future__ import annotations

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.blocks import Blocks, recompute
from slidemil.nn.masked import full_mask, real_rows
from slidemil.nn.nystrom import NystromAttention, square_side

_BAND_TOKENS = 8192  # PPEG rows per band when streaming: about this many tokens
# On a GPU bags up to this size are not streamed: recomputing every block in backward costs a second forward
# and a host call per block (246 ms a 50k step on the H200, issue 27), to save memory a GPU has: unstreamed,
# a 50k bag keeps ~1 GB of bf16 activations
GPU_STREAM_ABOVE = 262_144


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)); no MLP block, as in the official code (paper Sec. 3, TPT module)."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads, landmarks=landmarks, dropout=dropout)

    def forward(self, x, query_row=None, stream=False):
        return self.attn(x, query_row, prenorm=self.norm, stream=stream)


class PPEG(nn.Module):
    """Pyramid position encoding generator: x + DWConv7(x) + DWConv5(x) + DWConv3(x) on the token grid.
    The grid is convolved in bands of rows (each with the 3 rows either side its kernels reach), recomputed
    in backward when `stream`, so no grid-sized intermediate is kept."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))
        self.reach = max(conv.kernel_size[0] for conv in self.convs) // 2

    def _band(self, rows, side: int, r0: int, r1: int):
        """Grid rows r0..r1-1 after the convolutions; `rows(lo, hi)` gives tokens lo..hi-1."""
        a, b = max(0, r0 - self.reach), min(side, r1 + self.reach)
        grid = rows(a * side, b * side).transpose(1, 2).reshape(1, -1, b - a, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid[:, :, r0 - a:r1 - a].flatten(2).transpose(1, 2)

    def forward(self, x, side: int, stream: bool = False):
        cls, tokens = x[:, :1], x[:, 1:]
        if not stream:
            return torch.cat([cls, self._band(lambda lo, hi: tokens[:, lo:hi], side, 0, side)], 1)
        band = max(1, _BAND_TOKENS // side)
        rows = Blocks(tokens, band * side).rows
        bands = [recompute(self._band, rows, side, r0, min(r0 + band, side))
                 for r0 in range(0, side, band)]
        return torch.cat([cls, *bands], 1)


@register("transmil", paper="Shao et al., NeurIPS 2021 (arXiv 2106.00908)",
          summary="2 Nystrom self-attention layers + PPEG position encoding + class token",
          complexity="O(N*m), m = 256 landmarks")
class TransMIL(MILModel):
    """TransMIL (Shao et al., NeurIPS 2021, Sec. 3 and Algorithm 1, the TPT module): h = ReLU(W x); square the
    sequence to M = ceil(sqrt N)^2 by repeating the first M - N tokens (as the official code: list order, not
    coordinates, makes the grid); prepend a class token; TransLayer, PPEG, TransLayer; LayerNorm; classify the
    class token.

    Masking: each bag's real rows are taken out and processed alone, so padding cannot reach the
    squaring, the landmarks or the convolutions. `instance_scores` are the class token's Nyström
    attention row in the last layer (heads averaged), with duplicated tokens summed back onto the
    instance they copy. The official code's hard-coded `.cuda()` is not repeated.
    """

    scores_note = ("TransMIL's scores are the class token's attention after self-attention has mixed every patch "
                   "with the others in patch-list order (not space): they show what the token read, not where "
                   "the evidence lies; stripes follow the list order")

    attention_scores = True
    embedding_module = "fc1"
    packable = True

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, heads: int = 8,
                 landmarks: int = 256, dropout: float = 0.1, checkpoint_above: int = 16384):
        super().__init__(in_dim, n_outputs)
        self.checkpoint_above = checkpoint_above  # stream bags this large (see nn/nystrom.py)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1 = TransLayer(hidden_dim, heads, landmarks, dropout)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    def _one(self, x: torch.Tensor):
        n = x.shape[0]
        h = self.fc1(x)[None]
        side = square_side(n)
        source = torch.arange(side * side, device=x.device) % n   # position -> instance it copies
        h = torch.cat([self.cls_token.to(h.dtype), h[:, source]], 1)
        # bags this large are streamed: blocks of tokens recomputed in backward (memory, not results)
        limit = self.checkpoint_above if not x.is_cuda else max(self.checkpoint_above, GPU_STREAM_ABOVE)
        stream = self.training and torch.is_grad_enabled() and n > limit
        h, _ = self.layer1(h, stream=stream)
        h = self.ppeg(h, side, stream=stream)
        h, row = self.layer2(h, query_row=0, stream=stream)
        z = self.norm(h[:, 0].clone())   # a view would keep all of h alive for the norm's backward
        scores = torch.zeros(n, dtype=row.dtype, device=x.device).index_add_(0, source, row[1:])
        return self.classifier(z), scores, z

    def forward_packed(self, x, segments) -> MILOutput:
        """A pack of bags: each bag's squaring, Nyström landmarks and PPEG grid are its own, so each bag runs
        the layers on its own tokens, as PackMIL's official packed TransMIL (`pack_baseline.SAttention` with
        attn_type "ntrans" loops over the images of a pack; block-diagonal masks serve only its exact-
        attention ViT). The pack is still one step: one loss and one optimizer update for all its bags."""
        logits, scores, embeddings = zip(*(self._one(part) for part in x.split(segments.sizes)))
        return MILOutput(torch.cat(logits), torch.cat(scores).to(x.dtype), bag_embedding=torch.cat(embeddings))

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        logits, embeddings, scores = [], [], torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            lg, sc, z = self._one(real_rows(x, mask, b))
            logits.append(lg)
            embeddings.append(z)
            scores[b, mask[b]] = sc.to(x.dtype)
        return MILOutput(torch.cat(logits), scores, bag_embedding=torch.cat(embeddings))
