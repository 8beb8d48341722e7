"""DTFD-MIL: Zhang et al., "DTFD-MIL: Double-Tier Feature Distillation Multiple Instance Learning for
Histopathology Whole Slide Image Classification", CVPR 2022 (arXiv 2203.12081)."""

from __future__ import annotations

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.attention import AttentionScorer
from slidemil.nn.masked import full_mask, real_rows


class _AttentionHead(nn.Module):
    """Gated attention (K = 1) + linear classifier: returns (logits, pooled feature, weights)."""

    def __init__(self, dim: int, attn_dim: int, n_outputs: int):
        super().__init__()
        self.attention = AttentionScorer(dim, attn_dim, 1, gated=True)
        self.classifier = nn.Linear(dim, n_outputs)

    def forward(self, h: torch.Tensor):
        a = torch.softmax(self.attention(h)[:, 0], 0)
        f = a @ h
        return self.classifier(f), f, a


@register("dtfd", paper="Zhang et al., CVPR 2022 (arXiv 2203.12081)",
          summary="random pseudo-bags -> tier-1 ABMIL -> distilled features -> tier-2 ABMIL")
class DTFD(MILModel):
    """DTFD-MIL (Zhang et al., CVPR 2022, Sec. 3, double-tier feature distillation). Each bag's real instances
    are shuffled and split into M = `n_groups` pseudo-bags that inherit the bag label. Tier 1 (DimReduction
    Linear(D->512, no bias) + ReLU, gated attention with hidden 128, classifier) scores each pseudo-bag; one
    feature per pseudo-bag is distilled (`distill`: AFS = the attention-pooled feature; MaxS / MaxMinS = the top
    (and bottom) instances by the CAM probability p_k = softmax(W (a_k h_k))); tier 2 (gated attention +
    classifier) classifies the M distilled features. Loss = mean CE over pseudo-bags + CE(slide).

    Tier 2 sees *detached* tier-1 features: that is what the official two-optimizer scheme amounts to
    (its tier-2 gradients reach tier 1's buffers but are zeroed before use), without its pattern of
    stepping tier-1 parameters in place before backpropagating through the retained graph, which
    current PyTorch rejects. One optimizer over both tiers is then equivalent (Adam/AdamW are
    per-parameter). At evaluation the split uses a fixed seed, so predictions are deterministic and
    padding cannot change them. `instance_scores` are the CAM probabilities of the reported class.
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, attn_dim: int = 128, n_groups: int = 4,
                 distill: str = "AFS", instance_per_group: int = 1, eval_seed: int = 0):
        super().__init__(in_dim, n_outputs)
        if distill not in ("AFS", "MaxS", "MaxMinS"):
            raise ValueError("distill must be AFS, MaxS or MaxMinS")
        self.n_groups, self.distill, self.per_group, self.eval_seed = n_groups, distill, instance_per_group, eval_seed
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.tier1 = _AttentionHead(hidden_dim, attn_dim, n_outputs)
        self.tier2 = _AttentionHead(hidden_dim, attn_dim, n_outputs)

    def _split(self, n: int, device) -> list[torch.Tensor]:
        gen = None
        if not self.training:
            gen = torch.Generator().manual_seed(self.eval_seed)
        order = torch.randperm(n, generator=gen).to(device)
        return [g for g in torch.tensor_split(order, min(self.n_groups, n)) if len(g)]

    def _one(self, x: torch.Tensor):
        h = self.reduce(x)
        pseudo_logits, distilled = [], []
        # float32 whatever the autocast: CUDA's bf16 autocast returns softmax in float32, CPU's in bf16
        cam = torch.zeros(len(x), self.n_outputs, device=x.device)
        for idx in self._split(len(x), x.device):
            logits, f, a = self.tier1(h[idx])
            pseudo_logits.append(logits)
            probs = torch.softmax((a[:, None] * h[idx]) @ self.tier1.classifier.weight.T, -1)
            cam[idx] = probs.float()
            if self.distill == "AFS":
                distilled.append(f[None])
            else:
                k = min(self.per_group, len(idx))
                order = probs[:, -1].argsort(descending=True)
                pick = order[:k] if self.distill == "MaxS" else torch.cat([order[:k], order[-k:]])
                distilled.append(h[idx][pick])
        slide_logits, _, _ = self.tier2(torch.cat(distilled).detach())
        return slide_logits, torch.stack(pseudo_logits), cam

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        logits, pseudo, scores = [], [], torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            lg, ps, cam = self._one(real_rows(x, mask, b))
            logits.append(lg)
            pseudo.append(ps)
            c = -1 if self.n_outputs == 2 else int(lg.argmax())
            scores[b, mask[b]] = cam[:, c].to(x.dtype)
        return MILOutput(torch.stack(logits), scores, {"pseudo_logits": pseudo})

    def loss(self, out, target, task_loss):
        pseudo = out.extras["pseudo_logits"]     # each pseudo-bag inherits its bag's target
        tier1 = torch.stack([task_loss(ps, target[b:b + 1].expand(len(ps), *target.shape[1:])) for b, ps in enumerate(pseudo)])
        return tier1.mean() + task_loss(out.logits, target)
