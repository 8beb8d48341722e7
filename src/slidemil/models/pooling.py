"""Fixed pooling baselines: mean and max over instance embeddings, and instance-level max (mi-Net)."""

from __future__ import annotations

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput, pick_class, pick_class_packed
from slidemil.models.registry import register
from slidemil.nn.attention import mlp_embed
from slidemil.nn.masked import full_mask, masked_max, masked_mean
from slidemil.nn.segments import segment_max, segment_mean


class _EmbeddingPool(MILModel):
    """Shared body of MI-Net's embedding-level poolings: h_k = Dropout(ReLU(W_1 x_k)), a fixed pooling,
    then a linear classifier."""

    embedding_module = "embed"
    packable = True

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25):
        super().__init__(in_dim, n_outputs)
        self.embed = mlp_embed(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_outputs)


@register("mean_pool", paper="Wang et al., Pattern Recognition 2018 (MI-Net, mean pooling)",
          summary="embed each instance, average over the bag, linear classifier")
class MeanPool(_EmbeddingPool):
    """z = mean_k ReLU(W_1 x_k); logits = W_c z + b.

    Instance scores are W_c h_k for the reported class: the bag logit is exactly their mean plus b.
    """

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.embed(x)
        logits = self.classifier(masked_mean(h, mask))
        per_inst = (h @ self.classifier.weight.T).transpose(1, 2).masked_fill(~mask[:, None], 0.0)
        return MILOutput(logits, pick_class(per_inst, logits))

    streams = True

    def forward_stream(self, chunks) -> MILOutput:
        """The mean accumulated chunk by chunk; instance scores W_c h_k per chunk."""
        total, n, per_inst = None, 0, []
        for x in chunks:
            h = self.embed(x)
            total = h.sum(0) if total is None else total + h.sum(0)
            n += len(h)
            per_inst.append(h @ self.classifier.weight.T)
        logits = self.classifier((total / n)[None])
        return MILOutput(logits, pick_class(torch.cat(per_inst).T[None], logits))

    def forward_packed(self, x, segments) -> MILOutput:
        h = self.embed(x)
        logits = self.classifier(segment_mean(h, segments))
        return MILOutput(logits, pick_class_packed(h @ self.classifier.weight.T, logits, segments))


@register("max_pool", paper="Wang et al., Pattern Recognition 2018 (MI-Net, max pooling)",
          summary="embed each instance, element-wise max over the bag, linear classifier")
class MaxPool(_EmbeddingPool):
    """z = max_k ReLU(W_1 x_k) (per dimension); logits = W_c z + b.

    Instance score: the fraction of embedding dimensions whose maximum that instance supplies.
    """

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.embed(x)
        z, idx = masked_max(h, mask)
        share = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)
        share.scatter_add_(1, idx, torch.full_like(idx, 1.0 / idx.shape[1], dtype=h.dtype))
        return MILOutput(self.classifier(z), share)

    def forward_packed(self, x, segments) -> MILOutput:
        h = self.embed(x)
        z, first = segment_max(h, segments)                  # [n, H] values and token indices
        share = h.new_zeros(len(h)).index_add(0, first.reshape(-1), h.new_full((first.numel(),), 1.0 / first.shape[1]))
        return MILOutput(self.classifier(z), share)


@register("instance_max", paper="Wang et al., Pattern Recognition 2018 (mi-Net); Raff & Holt, NeurIPS 2023",
          summary="instance classifier, then max over instances (respects the standard MIL assumption)")
class InstanceMax(MILModel):
    """mi-Net: p_k = f(x_k) per instance, bag score = max_k p_k.

    Binary tasks score one positive logit per instance and return logits [0, max_k s_k], so that
    softmax gives sigmoid(max_k s_k): only positive evidence can raise the bag, as the standard MIL
    assumption requires. With C > 2 classes each class logit is its own max over instances.

    `mean_warmup_epochs` (slidemil's default 5; 0 is the paper's mi-Net): the first training epochs pool
    by the mean of the instance logits (mi-Net's mean-pooling variant) before the max takes over, much as
    mi-SVM (Andrews et al. 2002) starts by giving every instance its bag's label. A hard max from the first
    step trains only each bag's top instance, which an untrained scorer picks at random, so a small cohort
    is fitted by those instances; the mean first finds the direction that separates positive bags' instances
    from negative ones (docs/protocol.md: 1 -> 10 of 10 small-cohort seeds). Evaluation always takes the max.
    """

    packable = True

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, dropout: float = 0.25,
                 mean_warmup_epochs: int = 5):
        super().__init__(in_dim, n_outputs)
        self.binary = n_outputs == 2
        self.instance_net = nn.Sequential(mlp_embed(in_dim, hidden_dim, dropout),
                                          nn.Linear(hidden_dim, 1 if self.binary else n_outputs))
        self.mean_warmup_epochs = mean_warmup_epochs
        self._warming_up = False

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        self._warming_up = epoch < self.mean_warmup_epochs

    @property
    def _mean_now(self) -> bool:
        return self.training and self._warming_up

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        s = self.instance_net(x)                     # [B, N, C']
        top = masked_mean(s, mask) if self._mean_now else masked_max(s, mask)[0]    # [B, C']
        logits = torch.cat([torch.zeros_like(top), top], 1) if self.binary else top
        per_inst = s.transpose(1, 2).masked_fill(~mask[:, None], 0.0)
        return MILOutput(logits, pick_class(per_inst, logits), {"instance_logits": per_inst})

    def forward_packed(self, x, segments) -> MILOutput:
        s = self.instance_net(x)                     # [T, C']
        top = segment_mean(s, segments) if self._mean_now else segment_max(s, segments)[0]
        logits = torch.cat([torch.zeros_like(top), top], 1) if self.binary else top
        return MILOutput(logits, pick_class_packed(s, logits, segments), {"instance_logits": s})

