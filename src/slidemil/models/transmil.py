"""TransMIL: Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole
Slide Image Classification", NeurIPS 2021 (arXiv 2106.00908)."""

from __future__ import annotations

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.masked import full_mask
from slidemil.nn.nystrom import NystromAttention, square_side


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)); no MLP block, as in the official code (paper Sec. 3, TPT module)."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads, landmarks=landmarks, dropout=dropout)

    def forward(self, x, query_row=None):
        out, row = self.attn(self.norm(x), query_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding generator: x + DWConv7(x) + DWConv5(x) + DWConv3(x) on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x, side: int):
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)


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

    attention_scores = True
    embedding_module = "fc1"

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, heads: int = 8,
                 landmarks: int = 256, dropout: float = 0.1, checkpoint_above: int = 16384):
        super().__init__(in_dim, n_outputs)
        self.checkpoint_above = checkpoint_above  # recompute layers in backward for bags this large
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
        if self.training and torch.is_grad_enabled() and n > self.checkpoint_above:
            # activation checkpointing keeps a 50k-instance step within 4 GB on CPU (6 GB without)
            from torch.utils.checkpoint import checkpoint

            h, _ = checkpoint(self.layer1, h, use_reentrant=False)
            h = checkpoint(self.ppeg, h, side, use_reentrant=False)
            h, row = checkpoint(self.layer2, h, 0, use_reentrant=False)
        else:
            h, _ = self.layer1(h)
            h = self.ppeg(h, side)
            h, row = self.layer2(h, query_row=0)
        z = self.norm(h)[:, 0]
        scores = torch.zeros(n, dtype=row.dtype, device=x.device).index_add_(0, source, row[1:])
        return self.classifier(z), scores, z

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        logits, embeddings, scores = [], [], torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            lg, sc, z = self._one(x[b][mask[b]])
            logits.append(lg)
            embeddings.append(z)
            scores[b, mask[b]] = sc.to(x.dtype)
        return MILOutput(torch.cat(logits), scores, bag_embedding=torch.cat(embeddings))
