"""PackMIL: Tang, Fang, Wu, Li & Cheng, "Revisiting Data Challenges of Computational Pathology: A Pack-based
Multiple Instance Learning Framework", arXiv 2509.20923 (2025); official code FangHeng/PackMIL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidemil.models.base import MILOutput
from slidemil.nn.segments import pack_bags
from slidemil.train.strategies.base import Strategy, register_strategy

RESIDUAL_LOSSES = ("focal", "asl", "bce", "ce")


@register_strategy("packmil", paper="Tang et al. 2025 (arXiv 2509.20923)",
                   summary="packed training: per-slide main branch + residual 'hyperslide' branch with mixed targets")
class PackMIL(Strategy):
    """PackMIL (the card's Algorithm steps 1 and 3-6; official `get_packs`, `group_seqs`, `mixup_target_batched`).

    Training, per step of B bags: each bag is split by a random permutation into a *main* part (a `token_dropout`
    share of its instances: the official `n_allocated_single = int(N * token_dropout)` goes to the main part,
    so the name is the kept share) and a *residual* part (the rest). Main parts are packed (pack length
    `--pack-len`, doubled when the longest main part exceeds it, as the official forward does) and pooled per
    bag: one prediction per bag, the task's loss. Residual parts are packed the same way, but each pack is one
    bag, a "hyperslide", whose target mixes its member bags' one-hot labels (weighted by their instance counts
    with `ps_weight`). Residual losses: `focal` (default; the BRCA config: the official FocalLoss, alpha 0.25,
    gamma 2, on the mixture normalised by its maximum), `asl` (the PANDA config: timm's single-label asymmetric
    loss, gamma+ 1, gamma- 4, on the mixture's arg-max class; PANDA also sets ps_weight), `bce` (the class
    default) or `ce` (arg-max class). Loss = main_alpha * main + aux_alpha * residual (0.2 in both configs).
    Inference: each bag alone, unpacked.

    ADS (`--reembed ads`, the BRCA config's r = 4; `slidemil.models.ads`): each main and residual part is
    downsampled r-fold before packing (the pack length doubles when the longest main part exceeds it after
    downsampling), and at inference every bag goes through ADS's token-wise map, which the saved model keeps.

    Differences from the official code: bags of fewer than 2 instances (or under `min_seq_len`) go whole to
    both branches, and a split keeps at least one instance on each side (the official split can leave a main
    part empty); classification only (the survival mixtures are not reproduced).
    """

    requires_attention = False
    supports_packing = True
    needs_packing = True

    def __init__(self, model, token_dropout: float = 0.4, aux_alpha: float = 0.2, main_alpha: float = 1.0,
                 min_seq_len: int = 0, residual_loss: str = "focal", ps_weight: bool = False):
        super().__init__(model)
        if not model.packable:
            raise ValueError(f"strategy 'packmil' needs a model that pools per bag inside a pack; "
                             f"{type(model).__name__} does not (see `slidemil models`)")
        if not 0.0 < token_dropout < 1.0:
            raise ValueError(f"packmil token_dropout (the main branch's share of each bag) must be in (0, 1), "
                             f"not {token_dropout}")
        if residual_loss not in RESIDUAL_LOSSES:
            raise ValueError(f"packmil residual_loss must be one of {', '.join(RESIDUAL_LOSSES)}, not {residual_loss!r}")
        self.token_dropout, self.aux_alpha, self.main_alpha = token_dropout, aux_alpha, main_alpha
        self.min_seq_len, self.residual_loss, self.ps_weight = min_seq_len, residual_loss, ps_weight

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(main, residual) parts of one bag [n, D] by a random permutation."""
        n = len(x)
        if n < max(2, self.min_seq_len):
            return x, x
        perm = torch.randperm(n, device=x.device)
        k = min(n - 1, max(1, int(n * self.token_dropout)))
        return x[perm[:k]], x[perm[k:]]

    def forward_bags(self, bags: list[torch.Tensor], pack_len: int) -> MILOutput:
        main, residual = zip(*(self.split(b) for b in bags))
        ads = getattr(self.model, "encoder", None)                           # `--reembed ads`
        r = ads.r if hasattr(ads, "reduce") else 1
        length = pack_len * 2 if max(len(m) for m in main) / r > pack_len else pack_len
        aggregator = self.model
        if r > 1:   # each part downsampled r-fold before packing (official `get_packs`), then the aggregator alone
            main, residual = (self._downsampled(ads, parts, length) for parts in (main, residual))
            aggregator = self.model.model
        packed = pack_bags(list(main), length)
        out = aggregator.forward_packed(packed.tokens, packed.segments)
        res = pack_bags(list(residual), length)
        hyper = res.packs                                                    # each pack is one bag
        members = torch.zeros(hyper.n, len(bags), device=res.tokens.device)  # [hyperslides, bags]: token counts
        for i, (p, n) in enumerate(zip(res.pack_of, res.segments.sizes)):
            members[p, i] = n
        out.extras["residual"] = aggregator.forward_packed(res.tokens, hyper)
        out.extras["members"] = members if self.ps_weight else (members > 0).float()
        return out

    def _downsampled(self, ads, parts, length: int) -> list[torch.Tensor]:
        """Each part cut to a random `length * r` instances (official `max_pre_len`), then reduced r-fold by
        ADS; a part of at most `min_seq_len * r` instances only gets ADS's token-wise map."""
        out = []
        for part in parts:
            if len(part) > length * ads.r:
                part = part[torch.randperm(len(part), device=part.device)[:length * ads.r]]
            out.append(ads.reduce(part) if len(part) > self.min_seq_len * ads.r else ads(part[None])[0])
        return out

    def loss(self, out, target, task_loss):
        main = self.model.loss(out, target, task_loss)
        if "residual" not in out.extras:
            return main
        logits = out.extras["residual"].logits
        mix = out.extras["members"] @ F.one_hot(target, logits.shape[1]).to(logits.dtype)   # [hyperslides, C]
        if self.residual_loss == "ce":
            aux = F.cross_entropy(logits, mix.argmax(1))
        elif self.residual_loss == "asl":
            from timm.loss import AsymmetricLossSingleLabel  # on first use: timm pulls in torchvision
            aux = AsymmetricLossSingleLabel(gamma_pos=1, gamma_neg=4, eps=0.0)(logits, mix.argmax(1))
        else:
            soft = mix / mix.amax(1, keepdim=True).clamp_min(1e-12)
            aux = (focal_bce(logits, soft) if self.residual_loss == "focal"
                   else F.binary_cross_entropy_with_logits(logits, soft))
        return self.main_alpha * main + self.aux_alpha * aux


def focal_bce(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """PackMIL's `FocalLoss(alpha=0.25, gamma=2)`: mean of alpha (1 - p_t)^gamma BCE with p_t = exp(-BCE), on
    independent sigmoid outputs against soft targets (one alpha for both signs, as the official code)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (alpha * (1 - torch.exp(-bce)) ** gamma * bce).mean()
