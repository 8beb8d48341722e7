"""Latent (feature-space) augmentation during MIL training: HistAug's learnt generator and the simple
baselines its paper compares against. Training only; inference sees the features as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidemil.nn.detached import Detached
from slidemil.nn.masked import full_mask
from slidemil.train.strategies.base import Strategy, register_strategy


class FeatureAugmentation(Strategy):
    """Transforms the bag's features in training forwards, then calls the model. Each transform sees one bag at
    a time (its statistics, its partners), so a pack (`--pack-len`) is augmented bag by bag."""

    requires_attention = False
    supports_packing = True

    def augment(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, mask=None, coords=None):
        if self.training and torch.is_grad_enabled():
            mask = full_mask(x, mask)
            x = torch.where(mask[..., None], self.augment(x, mask), x)
        return self.model(x, mask, coords)

    def forward_packed(self, x, segments):
        if self.training and torch.is_grad_enabled():
            x = torch.cat([self.augment(part[None], full_mask(part[None], None))[0] for part in x.split(segments.sizes)])
        return self.model.forward_packed(x, segments)


@register_strategy("histaug", paper="Boutaj et al., ICCV 2025 (arXiv 2508.14588)",
                   summary="learnt latent augmentation, one transform set per slide (slidemil histaug fit)")
class HistAug(FeatureAugmentation):
    """HistAug (Boutaj et al., ICCV 2025, Sec. 3.2, latent augmentation in MIL training): with probability `p`
    per bag and step, the frozen generator of `slidemil histaug fit` (folder given as `generator`) maps every
    instance z to f(z, t), with one transform set t for the whole slide (`mode="wsi"`, the paper's
    recommendation) or one per instance (`mode="instance"`). The generator is loaded when training starts and is
    not part of the checkpoint; it must come from the encoder that made the features (checked by dimension and
    name)."""

    def __init__(self, model, generator: str | None = None, mode: str = "wsi", p: float = 1.0,
                 batch: int = 4096):
        super().__init__(model)
        if mode not in ("wsi", "instance"):
            raise ValueError(f"histaug mode must be 'wsi' or 'instance', not {mode!r}")
        self.generator_path, self.mode, self.p, self.batch = generator, mode, p, batch
        self.generator = Detached()  # frozen, not part of the checkpoint

    def fit_start(self, context) -> None:
        super().fit_start(context)
        from slidemil.augment.histaug import load_generator
        from slidemil.errors import InputError

        if not self.generator_path:
            raise InputError("--strategy histaug needs --strategy-arg generator=FOLDER (made by `slidemil histaug fit` "
                             "on patches of the same encoder); for the simple baselines use --strategy "
                             "feature_noise, feature_dropout or instance_mixup")
        gen = load_generator(self.generator_path, context.device)
        if gen.cfg.dim != self.model.in_dim:
            raise InputError(f"histaug generator {self.generator_path} was fit on {gen.cfg.dim}-d embeddings "
                             f"({gen.cfg.encoder}), but these features are {self.model.in_dim}-d; fit one on "
                             f"this encoder's patches")
        enc = context.encoder
        if enc and gen.cfg.encoder and enc != gen.cfg.encoder:
            raise InputError(f"histaug generator {self.generator_path} belongs to encoder {gen.cfg.encoder!r}, "
                             f"the features to {enc!r} (a generator is encoder-specific)")
        self.generator.module = gen

    @torch.no_grad()
    def augment(self, x, mask):
        from slidemil.augment.histaug import sample_params

        out = x.clone()
        for b in range(len(x)):
            if torch.rand(()) >= self.p:
                continue
            rows = mask[b].nonzero()[:, 0]
            params = sample_params(1 if self.mode == "wsi" else len(rows))
            for s in range(0, len(rows), self.batch):
                part = params if self.mode == "wsi" else {k: v[s:s + self.batch] for k, v in params.items()}
                idx = rows[s:s + self.batch]
                out[b, idx] = self.generator(x[b, idx].float(), part).to(x.dtype)
        return out


@register_strategy("feature_noise", paper="HistAug baseline", summary="Gaussian noise scaled by the bag's feature spread")
class FeatureNoise(FeatureAugmentation):
    """Baseline: x + sigma * std_d * eps, eps ~ N(0, 1), std_d the bag's per-dimension spread."""

    def __init__(self, model, sigma: float = 0.1):
        super().__init__(model)
        self.sigma = sigma

    def augment(self, x, mask):
        m = mask[..., None].to(x.dtype)
        n = m.sum(1, keepdim=True).clamp_min(2)
        mean = (x * m).sum(1, keepdim=True) / n
        std = (((x - mean) ** 2 * m).sum(1, keepdim=True) / (n - 1)).sqrt()
        return x + self.sigma * std * torch.randn_like(x)


@register_strategy("feature_dropout", paper="HistAug baseline", summary="element-wise dropout of feature values")
class FeatureDropout(FeatureAugmentation):
    """Baseline: element-wise dropout of feature values with rate p (rescaled by 1 / (1 - p))."""

    def __init__(self, model, p: float = 0.1):
        super().__init__(model)
        self.p = p

    def augment(self, x, mask):
        return F.dropout(x, self.p, training=True)


@register_strategy("instance_mixup", paper="HistAug baseline", summary="mix each instance with another of its bag")
class InstanceMixup(FeatureAugmentation):
    """Baseline: each instance is mixed with a random instance of the same bag,
    x_i' = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha) folded to [0.5, 1] so x_i stays dominant;
    the bag label is unchanged (both come from the same slide)."""

    def __init__(self, model, alpha: float = 0.4):
        super().__init__(model)
        self.alpha = alpha

    def augment(self, x, mask):
        out = x.clone()
        beta = torch.distributions.Beta(self.alpha, self.alpha)
        for b in range(len(x)):
            rows = mask[b].nonzero()[:, 0]
            partner = rows[torch.randint(len(rows), (len(rows),), device=rows.device)]
            lam = beta.sample((len(rows), 1)).to(x.device)
            lam = torch.maximum(lam, 1 - lam)
            out[b, rows] = lam * x[b, rows] + (1 - lam) * x[b, partner]
        return out
