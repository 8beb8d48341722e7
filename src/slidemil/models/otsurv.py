"""OTSurv: Ren, Wang, Fang, Ling & You, "OTSurv: A Novel Multiple Instance Learning Framework for Survival
Prediction with Heterogeneity-aware Optimal Transport", MICCAI 2025 (arXiv 2506.20741)."""

from __future__ import annotations

import math

import torch
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.masked import full_mask, real_rows
from slidemil.nn.sinkhorn import semi_relaxed_sinkhorn


def rho_schedule(iteration: float, rampup_iterations: float, base: float = 0.1, upper: float = 1.0) -> float:
    """The transported mass: rho = base + upper * exp(-5 (1 - t/T)^2) for t < T, clipped at 1 (the official
    `set_rho("sigmoid", ...)`, T = 10 epochs of iterations): the curriculum starts by moving ~10% of the
    mass, the cheapest patches, and reaches full transport after T."""
    t = min(max(iteration, 0.0), rampup_iterations) if rampup_iterations > 0 else 0.0
    ramp = 1.0 if rampup_iterations <= 0 else math.exp(-5.0 * (1.0 - t / rampup_iterations) ** 2)
    return min(base + upper * ramp, 1.0)


def shift_to_zero(x: torch.Tensor) -> torch.Tensor:
    """Each row minus its minimum (the official `normalize_feature`)."""
    return x - x.min(-1, keepdim=True).values


@register("otsurv", paper="Ren et al., MICCAI 2025 (arXiv 2506.20741)",
          summary="patches transported onto learnt prototypes by semi-relaxed curriculum OT (survival)",
          complexity="O(N K iters)")
class OTSurv(MILModel):
    """OTSurv (Sec. 2): h_i = Dropout(ReLU(W x_i)); prototypes P [K, d]; cost C = cdist(h~, P~) / max C with
    rows shifted to a zero minimum; plan Pi = semi-relaxed curriculum OT(C, rho) with the dummy column
    dropped, divided by rho; F = Pi^T H [K, d]; slide vector z = Linear(K -> 1)(F^T); logits = W_c z.

    Defaults as `train_otsurv.sh`: d = 256, K = 16, dropout 0.25, eps 0.1, gamma 1, tol 1e-10, up to 1000
    Sinkhorn iterations, rho ramped over 10 epochs of training iterations (rho = 1 in eval mode, as the
    official evaluation, which passes iteration 1000 of 10 per epoch). The official run trains with the
    Cox loss over batches of 16 slides (`--task survival --survival-loss cox --batch-size 16`); any task
    works. Because z is linear in the instances, z = sum_i alpha_i h_i + b with alpha_i = sum_k Pi_ik
    w_k: `instance_scores` are these alpha_i, and `extras["instance_logits"]` the contribution
    alpha_i W_c h_i of each patch to each logit (its share of the risk for a one-output survival head).
    """

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 256, n_prototypes: int = 16,
                 dropout: float = 0.25, epsilon: float = 0.1, gamma: float = 1.0, max_iter: int = 1000,
                 tol: float = 1e-10, rho_base: float = 0.1, rampup_epochs: float = 10.0):
        super().__init__(in_dim, n_outputs)
        self.patch_encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.prototypes = nn.Embedding(n_prototypes, hidden_dim)
        self.linear = nn.Linear(n_prototypes, 1)
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        self.ot = {"epsilon": epsilon, "gamma": gamma, "max_iter": max_iter, "tol": tol}
        self.rho_base, self.rampup_epochs = rho_base, rampup_epochs
        self.iteration, self.iterations_per_epoch = 0, None

    # -- the curriculum clock -----------------------------------------------------------------------
    def fit_start(self, context) -> None:
        self.iteration = 0
        self.iterations_per_epoch = math.ceil(len(context.train_ds) / context.cfg.batch_size)

    def rho(self) -> float:
        if not self.training:
            return 1.0
        per_epoch = self.iterations_per_epoch or 1
        return rho_schedule(self.iteration, self.rampup_epochs * per_epoch, self.rho_base)

    # -- forward ------------------------------------------------------------------------------------
    def transport(self, h: torch.Tensor, rho: float) -> torch.Tensor:
        """The plan [N, K] of one bag's embedded patches onto the prototypes, divided by rho."""
        cost = torch.cdist(shift_to_zero(h.float()), shift_to_zero(self.prototypes.weight.float()))
        cost = cost / cost.max().clamp_min(1e-12)
        return (semi_relaxed_sinkhorn(cost, rho, **self.ot) / rho).float()

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        rho = self.rho()
        if self.training:
            self.iteration += 1
        logits, scores = [], torch.zeros(mask.shape, device=x.device)
        per_instance = torch.zeros(x.shape[0], self.n_outputs, x.shape[1], device=x.device)
        slides = []
        for b in range(x.shape[0]):
            h = torch.nan_to_num(self.patch_encoder(real_rows(x, mask, b)))
            plan = self.transport(h, rho)                                 # [N_b, K]
            z = self.linear((plan.t() @ h).t())[:, 0]                     # [d]
            slides.append(z)
            logits.append(self.classifier(z))
            alpha = plan @ self.linear.weight[0]                          # [N_b]
            scores[b, mask[b]] = alpha.float()      # bf16 under autocast (the matmul), float32 buffers
            per_instance[b, :, mask[b]] = (alpha[:, None] * (h @ self.classifier.weight.t())).t().float()
        return MILOutput(torch.stack(logits), scores, {"instance_logits": per_instance},
                         bag_embedding=torch.stack(slides))

