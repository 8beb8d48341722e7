"""SC-MIL: Juyal et al., "SC-MIL: Supervised Contrastive Multiple Instance Learning for Imbalanced
Classification in Pathology", WACV 2024 (arXiv 2303.13405); no official code is published."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.train.strategies.base import Strategy, needs, register_strategy


def supcon_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                temperature: float) -> torch.Tensor | None:
    """SupCon (Khosla et al. 2020, L_out) of each anchor against the other anchors and a bank of
    earlier embeddings (all L2-normalised): -mean over positives of log softmax over all others.
    Anchors without a positive are skipped (their loss is undefined); None when no anchor has one."""
    keys = torch.cat([anchors, bank])
    key_labels = torch.cat([anchor_labels, bank_labels])
    logits = anchors @ keys.T / temperature                               # [A, K]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[:, :len(anchors)] = torch.eye(len(anchors), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = (anchor_labels[:, None] == key_labels[None]) & ~self_mask
    has_pos = positive.any(1)
    if not has_pos.any():
        return None
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp_min(1))
    return per_anchor[has_pos].mean()


@register_strategy("sc", paper="Juyal et al., WACV 2024 (arXiv 2303.13405)",
                   summary="supervised contrastive bag embeddings, curriculum to the classifier")
class SupConCurriculum(Strategy):
    """SC-MIL (Sec. 3, the curriculum-weighted joint loss): L = alpha(t) L_SupCon(g(z)) + (1 - alpha(t)) L_model, with z the
    aggregator's bag embedding, g a 2-layer MLP projection to `proj_dim` (128), temperature 0.07, and
    alpha(t) falling from 1 to 0 over the epochs: "parabolic" 1 - (t / T)^2 (BBN-style cumulative
    learning) or "linear". The paper's exact schedule is not public (no official code), so both are
    offered. The classifier's gradient reaches the aggregator (joint training).

    Contrast needs several slides per step: each step's bags are contrasted with each other and with a
    first-in-first-out bank of the last `bank_size` projected embeddings (detached), so batch size 1
    (the WSI default) works. Anchors without a same-label partner are skipped, never NaN.
    """

    requires_attention = False

    def __init__(self, model, temperature: float = 0.07, proj_dim: int = 128, bank_size: int = 64,
                 schedule: str = "parabolic"):
        super().__init__(model)
        if schedule not in ("parabolic", "linear"):
            raise ValueError(f"sc schedule must be 'parabolic' or 'linear', not {schedule!r}")
        self.temperature, self.schedule, self.bank_size = temperature, schedule, bank_size
        dim = self._embedding_dim()
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        self.alpha = 1.0
        self.bank = (torch.zeros(0, proj_dim), torch.zeros(0, dtype=torch.long))

    def _embedding_dim(self) -> int:
        """Read z's size off one tiny forward in eval mode (models differ: hidden size, heads...)."""
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model(torch.zeros(1, 4, self.model.in_dim))
        self.model.train(was)
        return needs(out.bag_embedding, "bag embedding", "sc", self.model).shape[-1]

    def fit_start(self, context) -> None:
        super().fit_start(context)
        self.bank = (torch.zeros(0, self.projection[-1].out_features, device=context.device),
                                 torch.zeros(0, dtype=torch.long, device=context.device))

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        super().epoch_start(epoch, n_epochs)
        t = epoch / max(1, n_epochs - 1)   # 0 at the first epoch, 1 at the last: alpha ends at 0
        self.alpha = 1 - t ** 2 if self.schedule == "parabolic" else 1 - t

    def loss(self, out, target, task_loss):
        model_loss = self.model.loss(out, target, task_loss)
        if not self.training or self.alpha <= 0:
            return model_loss
        p = F.normalize(self.projection(needs(out.bag_embedding, "bag embedding", "sc", self.model).float()), dim=-1)
        bank, bank_labels = self.bank
        contrast = supcon_loss(p, target, bank.to(p.device), bank_labels.to(p.device), self.temperature)
        self.bank = (torch.cat([bank.to(p.device), p.detach()])[-self.bank_size:],
                                 torch.cat([bank_labels.to(p.device), target])[-self.bank_size:])
        if contrast is None:   # no anchor has a same-label partner yet: only the weighted classifier term
            return (1 - self.alpha) * model_loss
        return self.alpha * contrast + (1 - self.alpha) * model_loss
