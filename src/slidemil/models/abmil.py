"""ABMIL: Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018."""

from __future__ import annotations

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.attention import AttentionScorer, mlp_embed
from slidemil.nn.masked import full_mask, masked_softmax
from slidemil.nn.segments import segment_pool, segment_softmax


@register("abmil", paper="Ilse et al., ICML 2018 (arXiv 1802.04712)",
          summary="attention pooling (plain or gated) of embedded instances")
class ABMIL(MILModel):
    """ABMIL (Ilse et al., ICML 2018, Sec. 2.4, attention-based and gated-attention pooling): h_k = ReLU(W_1
    x_k); a_k = softmax_k(w^T(tanh(V h_k) [* sigm(U h_k)])); z = sum_k a_k h_k; logits = W_c z.

    Defaults: 512-d embedding and dropout 0.25 after W_1 (the usual WSI setting, as CLAM), 128-d attention (the
    paper's L = 128), gated. Ilse's attention network has no dropout, so `attn_dropout` defaults to 0; set it to
    0.25 for CLAM's variant. `instance_scores` are the softmax weights a_k; the raw logits are kept in
    `extras["attention_logits"]` for regularisers that act before the softmax; `bag_embedding` (z) and
    `instance_embeddings` (h) serve the training strategies (MHIM's consistency and CAM scores, SC's contrast).
    """

    attention_scores = True
    embedding_module = "embed"
    packable = True
    streams = True

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, attn_dim: int = 128,
                 gated: bool = True, dropout: float = 0.25, attn_dropout: float = 0.0):
        super().__init__(in_dim, n_outputs)
        self.embed = mlp_embed(in_dim, hidden_dim, dropout)
        self.attention = AttentionScorer(hidden_dim, attn_dim, 1, gated, attn_dropout)
        self.classifier = nn.Linear(hidden_dim, n_outputs)

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.embed(x)
        raw = self.attention(h)[..., 0]                    # [B, N]
        a = masked_softmax(raw, mask)
        z = (a.unsqueeze(1) @ h)[:, 0]                     # [B, hidden]
        return MILOutput(self.classifier(z), a, {"attention_logits": raw}, bag_embedding=z, instance_embeddings=h)

    def forward_packed(self, x, segments) -> MILOutput:
        """PackMIL's pack-aware ABMIL: the softmax runs within each bag's tokens of the pack."""
        h = self.embed(x)                                  # [T, hidden]
        raw = self.attention(h)[:, 0]                      # [T]
        a = segment_softmax(raw, segments)
        z = segment_pool(a, h, segments)                   # [n, hidden]
        return MILOutput(self.classifier(z), a, {"attention_logits": raw}, bag_embedding=z, instance_embeddings=h)

    def forward_stream(self, chunks) -> MILOutput:
        """The attention softmax and the pooled z accumulated over chunks with a running maximum (the online
        softmax): z = sum_k exp(s_k - m) h_k / sum_k exp(s_k - m), rescaled whenever m grows. Only the raw
        scores [N] are kept whole, for the instance scores."""
        top, total, z, raws = None, None, None, []
        for x in chunks:
            h = self.embed(x)
            raw = self.attention(h)[:, 0]
            new_top = raw.max() if top is None else torch.maximum(top, raw.max())
            e = torch.exp(raw - new_top)
            if top is None:
                total, z = e.sum(), e @ h
            else:
                scale = torch.exp(top - new_top)
                total, z = total * scale + e.sum(), z * scale + e @ h
            top = new_top
            raws.append(raw)
        raw = torch.cat(raws)
        z = (z / total)[None]
        return MILOutput(self.classifier(z), (torch.exp(raw - top) / total)[None], {"attention_logits": raw[None]},
                         bag_embedding=z)
