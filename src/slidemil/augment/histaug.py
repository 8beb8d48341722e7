"""HistAug: Boutaj et al., "Controllable Latent Space Augmentation for Digital Pathology", ICCV 2025
(arXiv 2508.14588).

A generator f(z, t) learns what an encoder E makes of an augmented patch, f(E(x), t) ~ E(T_t(x)), so
MIL training can augment 10^4-10^5 embeddings per slide without touching pixels. This module holds the
image-space transforms t (the training targets), the generator, and `fit` (`slidemil histaug fit`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from slidemil.errors import InputError
from slidemil.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)

# The paper's 13 transforms, as the official `PatchAugmentation` and config: discrete ones carry a code
# (0 = not applied) and fire with probability 0.75; continuous ones always fire with a value drawn from
# [-0.5, 0.5]. The order of application is sampled too.
DISCRETE = {"rotation": 4, "crop": 6, "hflip": 2, "vflip": 2, "blur": 2, "erosion": 2, "dilation": 2}
CONTINUOUS = ("brightness", "contrast", "saturation", "hue", "gamma", "hed")
TRANSFORMS = tuple(DISCRETE) + CONTINUOUS
P_APPLY = 0.75
RANGE = 0.5

# Ruifrok & Johnston's stain vectors (as scikit-image's rgb_from_hed), for the HED shift
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
# the official HED shift (Faryna et al., MIDL 2021, as `utils/hed.py`): per-channel factors, sigma, and the
# offset added before the logarithm (pi in the official code)
_HED_FACTORS, _HED_SIGMA, _HED_EPS = torch.tensor([-2.0, 2.0, -3.0]), 0.03, 3.14159
# official kernels: Gaussian blur 15 px (torchvision's default sigma for it), 4 x 4 erosion / dilation,
# five-crop of 128 px from the 224 px patches (4 / 7 of the side)
BLUR_KERNEL, MORPH_KERNEL, CROP_SHARE = 15, 4, 128 / 224


def sample_params(n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """n parameter sets: codes [n] (long) per discrete transform, values [n] per continuous one, and
    `order` [n, 13], the position at which each transform is applied."""
    g = generator
    out: dict[str, torch.Tensor] = {}
    for name, k in DISCRETE.items():
        on = torch.rand(n, generator=g) < P_APPLY
        out[name] = torch.where(on, torch.randint(1, k, (n,), generator=g), 0)
    for name in CONTINUOUS:
        out[name] = (torch.rand(n, generator=g) * 2 - 1) * RANGE
    out["order"] = torch.argsort(torch.rand(n, len(TRANSFORMS), generator=g), 1)
    return out


def _crop(img: torch.Tensor, code: int) -> torch.Tensor:
    """codes 1-5: torchvision's five_crop order (top-left, top-right, bottom-left, bottom-right, centre) of a
    crop 4/7 of the side (128 of 224 px, official); resized back to the tile size, as the encoder's own
    transform would resize the 128 px crop."""
    from torchvision.transforms.v2 import functional as TF

    s = img.shape[-1]
    c = round(s * CROP_SHARE)
    top, left = {1: (0, 0), 2: (0, s - c), 3: (s - c, 0), 4: (s - c, s - c), 5: ((s - c) // 2, (s - c) // 2)}[code]
    return TF.resize(img[..., top:top + c, left:left + c], [s, s], antialias=True)


def _hed(img: torch.Tensor, v: float) -> torch.Tensor:
    """HED shift: hed = -log(rgb + eps) M; hed * (1 + v f sigma) + v f sigma per channel; back to RGB."""
    hed = -torch.log(img.movedim(0, -1) + _HED_EPS) @ _HED_FROM_RGB
    shift = v * _HED_FACTORS * _HED_SIGMA
    return (torch.exp(-((hed * (1 + shift) + shift) @ _RGB_FROM_HED)) - _HED_EPS).movedim(-1, 0).clamp(0, 1)


def _morph(img: torch.Tensor, sign: float) -> torch.Tensor:
    """Grey dilation (sign 1) or erosion (-1) with a flat k x k kernel anchored at k // 2, as kornia's."""
    k = MORPH_KERNEL
    return sign * F.max_pool2d(sign * img[None], k, 1, k // 2)[0, ..., :img.shape[-2], :img.shape[-1]]


def apply_transforms(img: torch.Tensor, params: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """The i-th parameter set applied to one float image [3, H, W] in [0, 1], in its sampled order."""
    from torchvision.transforms.v2 import functional as TF  # on first use (seconds at import; see foundation.py)

    for pos in params["order"][i].argsort().tolist():       # transform index applied at each position
        name = TRANSFORMS[pos]
        v = params[name][i].item()
        if v == 0:
            continue
        if name == "rotation":
            img = torch.rot90(img, int(v), dims=(-2, -1))
        elif name == "crop":
            img = _crop(img, int(v))
        elif name == "hflip":
            img = img.flip(-1)
        elif name == "vflip":
            img = img.flip(-2)
        elif name == "blur":
            img = TF.gaussian_blur(img, [BLUR_KERNEL, BLUR_KERNEL])
        elif name == "erosion":
            img = _morph(img, -1.0)
        elif name == "dilation":
            img = _morph(img, 1.0)
        elif name == "brightness":
            img = TF.adjust_brightness(img, 1 + v)
        elif name == "contrast":
            img = TF.adjust_contrast(img, 1 + v)
        elif name == "saturation":
            img = TF.adjust_saturation(img, 1 + v)
        elif name == "hue":
            img = TF.adjust_hue(img, v)
        elif name == "gamma":
            img = TF.adjust_gamma(img, 1 + v)
        elif name == "hed":
            img = _hed(img, v)
    return img.clamp(0, 1)


def _sincos(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class CrossBlock(nn.Module):
    """Pre-LN cross-attention (queries: embedding chunks; keys/values: transform tokens) with q/k
    LayerNorm, then an MLP (ratio 4), both residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [P, C, dim] (P patches, C chunks); t [P or 1, T, dim] transform tokens."""
        p, c, d = x.shape
        h = self.heads
        q = self.q_norm(self.q(self.norm_q(x)).view(p, c, h, -1).transpose(1, 2))
        k, v = self.kv(self.norm_kv(t)).view(t.shape[0], t.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, self.k_norm(k).expand(p, -1, -1, -1), v.expand(p, -1, -1, -1))
        x = x + self.out(attn.transpose(1, 2).reshape(p, c, d))
        return x + self.mlp(self.norm_mlp(x))


@dataclass
class GeneratorConfig:
    dim: int                      # the encoder's embedding size
    chunk_size: int = 4
    depth: int = 16
    heads: int = 8
    encoder: str = ""


class HistAugGenerator(nn.Module):
    """f(z, t): z split into `chunk_size` tokens (+ fixed sin-cos chunk positions) attend, through
    `depth` cross-attention blocks, to one token per transform (embedding of the code, or
    MLP(1 -> 2e -> e, SiLU) of the value) plus a learnt embedding of its position in the order;
    LayerNorm, concatenation, Linear(d, d)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.dim % cfg.chunk_size:
            raise ValueError(f"embedding size {cfg.dim} is not divisible by chunk_size {cfg.chunk_size}")
        self.cfg = cfg
        e = cfg.dim // cfg.chunk_size
        heads = math.gcd(cfg.heads, e)
        self.register_buffer("chunk_pos", _sincos(cfg.chunk_size, e), persistent=False)
        self.codes = nn.ModuleDict({k: nn.Embedding(n, e) for k, n in DISCRETE.items()})
        self.values = nn.ModuleDict({k: nn.Sequential(nn.Linear(1, 2 * e), nn.SiLU(), nn.Linear(2 * e, e))
                                     for k in CONTINUOUS})
        self.order = nn.Embedding(len(TRANSFORMS), e)
        self.blocks = nn.ModuleList(CrossBlock(e, heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(e)
        self.head = nn.Linear(cfg.dim, cfg.dim)

    def transform_tokens(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.head.weight.device
        tokens = [self.codes[k](params[k].to(device)) for k in DISCRETE]
        tokens += [self.values[k](params[k].to(device, torch.float32)[:, None]) for k in CONTINUOUS]
        return torch.stack(tokens, 1) + self.order(params["order"].to(device))   # [n, 13, e]

    def forward(self, z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """z [P, d]; params with n = P (instance-wise) or n = 1 (one set for all: WSI-wise)."""
        p = z.shape[0]
        x = z.view(p, self.cfg.chunk_size, -1) + self.chunk_pos
        t = self.transform_tokens(params)
        for block in self.blocks:
            x = block(x, t)
        return self.head(self.norm(x).reshape(p, -1))


def save_generator(folder: Path, model: HistAugGenerator, report: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "histaug.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(folder / "histaug.json", {"config": asdict(model.cfg), **report})


def load_generator(path: str | Path, device="cpu") -> HistAugGenerator:
    """`path`: the folder `slidemil histaug fit` wrote (histaug.json + histaug.safetensors)."""
    folder = Path(path)
    meta, weights = folder / "histaug.json", folder / "histaug.safetensors"
    if not meta.is_file() or not weights.is_file():
        raise InputError(f"{folder}: needs histaug.json and histaug.safetensors; make them with `slidemil histaug fit`")
    model = HistAugGenerator(GeneratorConfig(**json.loads(meta.read_text())["config"]))
    model.load_state_dict(load_file(str(weights), device=str(torch.device(device))))
    return model.to(device).eval().requires_grad_(False)


class FitSettings(BaseModel):
    """Settings of `slidemil histaug fit` (flag help and defaults come from here)."""

    model_config = ConfigDict(extra="forbid")

    patches_per_slide: int = Field(64, ge=1, description="Patches sampled per slide.")
    augmentations: int = Field(4, ge=1, description="Augmented views per patch.")
    epochs: int = Field(2000, ge=1, description="Generator training epochs (the paper's 2000); training stops "
                        "early when the validation MSE has not improved for --patience epochs.")
    patience: int = Field(50, ge=1, description="Epochs without a better validation MSE before stopping.")
    batch_size: int = Field(32, ge=1, description="Patches per optimisation step.")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate (the paper's).")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay (the paper's).")
    depth: int = Field(16, ge=1, description="Cross-attention blocks (the paper: 16).")
    chunk_size: int = Field(4, ge=1, description="Embedding chunk size of the generator's tokens.")
    heldout: float = Field(0.2, gt=0, lt=1, description="Share of slides held out to measure the generator.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for sampling and initialisation.")


def collect_pairs(tiles: list[torch.Tensor], encoder, settings: FitSettings, device, generator) -> dict:
    """Encode each tile and `augmentations` augmented copies: (z, params, z_aug) training triples."""
    zs, zaugs, params = [], [], []
    with torch.no_grad():
        for start in range(0, len(tiles), settings.batch_size):
            batch = torch.stack(tiles[start:start + settings.batch_size]).float().div(255)
            z = encoder(batch.to(device)).float().cpu()
            for _ in range(settings.augmentations):
                pr = sample_params(len(batch), generator)
                aug = torch.stack([apply_transforms(img, pr, i) for i, img in enumerate(batch)])
                zs.append(z)
                zaugs.append(encoder(aug.to(device)).float().cpu())
                params.append(pr)
    return {"z": torch.cat(zs), "z_aug": torch.cat(zaugs),
            "params": {k: torch.cat([p[k] for p in params]) for k in params[0]}}


def _mse(model: HistAugGenerator, pairs: dict, idx: torch.Tensor, device) -> float:
    """MSE of the generator on the pairs `idx` (one tenth of the training pairs, used to stop early)."""
    model.eval()
    with torch.no_grad():
        pred = model(pairs["z"][idx].to(device), {k: v[idx] for k, v in pairs["params"].items()})
        return float(F.mse_loss(pred, pairs["z_aug"][idx].to(device)))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def fit_generator(train: dict, test: dict, encoder_name: str, settings: FitSettings, device) -> tuple[HistAugGenerator, dict]:
    """MSE between f(z, t) and E(T_t(x)); AdamW (the paper's lr 5e-4, weight decay 1e-5). Reports the held-out
    mean cosine similarity of generated vs real augmented embeddings (the paper's metric) next to the identity
    baseline cos(z, E(T_t(x))), which a useful generator must beat."""
    torch.manual_seed(settings.seed)
    model = HistAugGenerator(GeneratorConfig(train["z"].shape[1], settings.chunk_size, settings.depth,
                                             encoder=encoder_name)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.randperm(len(train["z"]))
    val_idx, fit_idx = order[:max(1, len(order) // 10)], order[max(1, len(order) // 10):]
    n = len(fit_idx)
    steps = settings.epochs * math.ceil(n / settings.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    best, best_state, since = math.inf, None, 0
    for epoch in range(settings.epochs):
        model.train()
        perm = fit_idx[torch.randperm(n)]
        for start in range(0, n, settings.batch_size):
            idx = perm[start:start + settings.batch_size]
            pred = model(train["z"][idx].to(device), {k: v[idx] for k, v in train["params"].items()})
            loss = F.mse_loss(pred, train["z_aug"][idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = _mse(model, train, val_idx, device)
        log.info("histaug epoch %d: train mse %.5f, validation mse %.5f", epoch + 1, loss.item(), val)
        if val < best:
            best, since = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= settings.patience:
                log.info("histaug: no better validation mse for %d epochs, stopping at epoch %d", since, epoch + 1)
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        pred = model(test["z"].to(device), test["params"]).cpu()
    report = {"heldout_pairs": len(test["z"]), "train_pairs": n,
              "heldout_cosine": _cosine(pred, test["z_aug"]),
              "identity_cosine": _cosine(test["z"], test["z_aug"]),
              "heldout_mse": float(F.mse_loss(pred, test["z_aug"])),
              "identity_mse": float(F.mse_loss(test["z"], test["z_aug"])),
              "settings": settings.model_dump()}
    return model.requires_grad_(False), report


def split_slides(ids: list[str], heldout: float, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(ids))
    n_test = max(1, int(round(len(ids) * heldout))) if len(ids) > 1 else 0
    return order[n_test:], order[:n_test]
