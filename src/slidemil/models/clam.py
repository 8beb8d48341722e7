"""CLAM-SB / CLAM-MB: Lu et al., "Data-efficient and weakly supervised computational pathology on
whole-slide images", Nature Biomedical Engineering 2021 (arXiv 2004.09666)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.models.base import MILModel, MILOutput, pick_class
from slidemil.models.registry import register
from slidemil.nn.attention import AttentionScorer, mlp_embed
from slidemil.nn.masked import full_mask, masked_softmax


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0):
    """Smooth top-1 multiclass SVM (Berrada et al., ICLR 2018), the `--inst_loss svm` of CLAM:
    tau * log sum_j exp((alpha [j != y] + s_j - s_y) / tau), averaged over rows."""
    margin = alpha * (1 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    s_y = logits.gather(1, target[:, None])
    return (tau * torch.logsumexp((margin + logits - s_y) / tau, dim=1)).mean()


class _CLAM(MILModel):
    """Shared body of CLAM-SB and CLAM-MB (Lu et al., Nat. Biomed. Eng. 2021, Methods: "CLAM").

    h = Dropout(ReLU(W_1 x)); gated attention with `n_branches` branches; instance classifiers
    g_c: Linear(512 -> 2), one per class. Loss (the paper's slide loss plus instance-level clustering, Methods):
    L = bag_weight * L_bag + (1 - bag_weight) * L_inst, with L_inst over the top-B / bottom-B
    instances by attention of the true class's branch (pseudo-labels 1 / 0) and, with `subtyping`,
    the top-B of every other class's branch as 0. B is clamped to the bag size (official pitfall: topk
    crashes on bags smaller than B in the official code) and padded rows are never sampled.

    Defaults follow the official commands: the smooth top-1 SVM instance loss (`--inst_loss svm`) and, for the
    subtyping tasks (more than two classes), `--subtyping`; `subtyping=None` picks it by the number of
    classes (pass `subtyping=true` for a two-class subtyping task such as LUAD vs LUSC).
    """

    attention_scores = True
    embedding_module = "embed"

    n_branches_of = staticmethod(lambda n_outputs: 1)

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, attn_dim: int = 256,
                 gated: bool = True, dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7,
                 inst_loss: str = "svm", subtyping: bool | None = None):
        super().__init__(in_dim, n_outputs)
        if inst_loss not in ("ce", "svm"):
            raise ValueError("inst_loss must be 'ce' or 'svm'")
        subtyping = n_outputs > 2 if subtyping is None else subtyping
        self.k_sample, self.bag_weight, self.subtyping, self.inst_loss = k_sample, bag_weight, subtyping, inst_loss
        self.embed = mlp_embed(in_dim, hidden_dim, dropout)
        self.attention = AttentionScorer(hidden_dim, attn_dim, self.n_branches_of(n_outputs), gated, dropout)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_outputs))

    def _pool(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.embed(x)
        raw = self.attention(h).transpose(1, 2)           # [B, K, N]
        a = masked_softmax(raw, mask[:, None])
        logits = self._pool(h, a)
        scores = pick_class(a, logits) if a.shape[1] > 1 else a[:, 0]
        return MILOutput(logits, scores, {"attention": a, "attention_logits": raw, "mask": mask}, instance_embeddings=h)

    def _instance_loss(self, h, a, mask, label: int) -> torch.Tensor:
        n = int(mask.sum())
        k = max(1, min(self.k_sample, n))
        real_h = h[mask]
        terms = []
        for c, clf in enumerate(self.instance_classifiers):
            if c != label and not self.subtyping:
                continue
            att = a[min(c, a.shape[0] - 1)][mask]
            top = torch.topk(att, k).indices
            if c == label:
                bottom = torch.topk(-att, k).indices
                idx = torch.cat([top, bottom])
                target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            else:
                idx, target = top, torch.zeros(k, dtype=torch.long, device=h.device)
            logits = clf(real_h[idx])
            terms.append(smooth_top1_svm(logits, target) if self.inst_loss == "svm"
                         else F.cross_entropy(logits, target))
        total = torch.stack(terms).sum()
        return total / len(self.instance_classifiers) if self.subtyping else total

    instance_loss_active = True

    def fit_start(self, context) -> None:
        """The instance-clustering loss needs class labels: with a survival, regression or ordinal task
        CLAM trains on the task loss alone (bag_weight 1), as the CLAM survival forks do."""
        self.instance_loss_active = getattr(context.cfg, "task", "classification") == "classification"

    def loss(self, out, target, task_loss):
        if not self.instance_loss_active:
            return task_loss(out.logits, target)
        ex = out.extras
        inst = torch.stack([self._instance_loss(out.instance_embeddings[b], ex["attention"][b], ex["mask"][b], int(target[b]))
                            for b in range(len(target))]).mean()
        return self.bag_weight * task_loss(out.logits, target) + (1 - self.bag_weight) * inst


@register("clam_sb", paper="Lu et al., Nat. Biomed. Eng. 2021 (arXiv 2004.09666)",
          summary="gated attention + instance-clustering loss on top/bottom-B instances")
class CLAMSB(_CLAM):
    """CLAM single-branch: m = sum_k a_k h_k; logits = Linear(512 -> C)(m)."""

    def __init__(self, in_dim: int, n_outputs: int, **kwargs):
        super().__init__(in_dim, n_outputs, **kwargs)
        self.classifier = nn.Linear(self.embed[0].out_features, n_outputs)

    def _pool(self, h, a):
        return self.classifier((a @ h)[:, 0])


@register("clam_mb", paper="Lu et al., Nat. Biomed. Eng. 2021 (arXiv 2004.09666)",
          summary="one attention branch and one bag classifier per class, + instance-clustering loss",
          complexity="O(N*C)")
class CLAMMB(_CLAM):
    """CLAM multi-branch: m_c = sum_k a_{c,k} h_k; logit_c = Linear_c(512 -> 1)(m_c)."""

    n_branches_of = staticmethod(lambda n_outputs: n_outputs)

    def __init__(self, in_dim: int, n_outputs: int, **kwargs):
        super().__init__(in_dim, n_outputs, **kwargs)
        hidden = self.embed[0].out_features
        self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_outputs))

    def _pool(self, h, a):
        m = a @ h                                           # [B, C, hidden]
        return torch.cat([clf(m[:, c]) for c, clf in enumerate(self.classifiers)], 1)
