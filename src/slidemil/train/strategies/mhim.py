"""MHIM-MIL: Tang et al., "Multiple Instance Learning Framework with Masked Hard Instance Mining for
Whole Slide Image Classification", ICCV 2023 (arXiv 2307.15254) = v1; IJCV 2025 (arXiv 2509.11526) = v2."""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from slidemil.errors import InputError
from slidemil.models.base import MILOutput
from slidemil.models.checkpoint import inference_state
from slidemil.nn.detached import Detached
from slidemil.nn.masked import full_mask
from slidemil.rundir import RunDir
from slidemil.train.strategies.base import Strategy, needs, register_strategy

log = logging.getLogger(__name__)


def cosine_ramp(start: float, end: float, step: int, total: int) -> float:
    """The official `cosine_scheduler` value at `step`: start -> end along half a cosine."""
    progress = min(1.0, step / max(1, total))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def hard_instance_mask(scores: torch.Tensor, mask: torch.Tensor, ratio_h: float, ratio_hr: float,
                       ratio_l: float = 0.0, ratio_random: float = 0.0, generator=None) -> torch.Tensor:
    """Which instances the student keeps (v1 paper, Sec. 3.2, masked hard instance mining), counted as the
    official `get_mask` / `select_mask_fn` count them. Per bag of n real instances, in this order:
    ceil(n * ratio_random) random instances; then the ceil(n * ratio_l) lowest-scored; then the hard ones:
    of the top ceil(n * ratio_h / ratio_hr) by teacher score, ceil(that * ratio_hr) at random, i.e.
    about ceil(n * ratio_h) hard instances (when ratio_h / ratio_hr > 1 the whole bag is the pool and
    ratio_h the random share, as official). Every count is on the whole bag: `get_mask` passes the earlier
    masks' indices (`cls_attn_topk_idx_other`), so `select_mask_fn` keeps ps_tmp = ps; counting on what
    the earlier masks left would halve hard-instance mining at the default random ratio 0.5. Low and hard
    candidates are ranked over the whole bag, so they may overlap earlier masks (a union, as official).
    At least one instance is always kept."""
    keep = mask.clone()
    for b in range(len(scores)):
        real = mask[b].nonzero()[:, 0]
        n = len(real)
        order = real[scores[b, real].float().argsort(descending=True)]         # highest score first
        masked = torch.zeros(n, dtype=torch.bool)                              # over `order` positions
        if ratio_random > 0:
            masked[torch.randperm(n, generator=generator)[:math.ceil(n * ratio_random)]] = True
        if ratio_l > 0:
            masked[n - math.ceil(n * ratio_l):] = True
        if ratio_h > 0 and ratio_hr > 0:
            pool_ratio, share = ratio_h / ratio_hr, ratio_hr
            if pool_ratio > 1:
                pool_ratio, share = 1.0, ratio_h
            n_top = math.ceil(n * pool_ratio)
            pick = torch.randperm(n_top, generator=generator)[:math.ceil(n_top * share)] if share < 1 \
                else torch.arange(n_top)
            masked[pick] = True
        keep[b, order[masked.to(order.device)]] = False
        if not keep[b].any():
            keep[b, order[-1]] = True
    return keep


def cam_scores(attention: torch.Tensor, h: torch.Tensor, classifier: nn.Linear) -> torch.Tensor:
    """v2 CAM scores s_i = max_c softmax_c(W_c a_i h_i + b_0), as the official code computes them: the
    first class's bias is added to every class, so it cancels in the softmax. (Adding each class's own
    bias would let the bias decide the max class, since a_i h_i is ~1/N of a bag embedding.)"""
    logits = F.linear(attention[..., None] * h, classifier.weight)
    if classifier.bias is not None:
        logits = logits + classifier.bias[0]
    return torch.softmax(logits, -1).amax(-1)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temp_s: float, temp_t: float) -> torch.Tensor:
    """-sum softmax(z_T / tau_t) * log_softmax(z_S / tau_s) over the feature axis, mean over bags."""
    return -(F.softmax(teacher / temp_t, -1) * F.log_softmax(student / temp_s, -1)).sum(-1).mean()


class Merge(nn.Module):
    """v2 random merge (official `mhim_modules/merge.py`): k global queries cross-attend to the tokens left out
    of the kept share, z = MCA(LN(tokens), LN(queries)) (8 heads of 64, dropout 0.1, output projection); the k
    outputs join the student's tokens. The queries get no gradient: they start uniform(+-sqrt(6 / (3 * 256 +
    dim))) (VPT's init, as official) and follow z by EMA with momentum `merge_mm`. Runs in the model's
    instance-embedding space, as official (after `patch_to_emb`)."""

    def __init__(self, dim: int, k: int, momentum: float, heads: int = 8, head_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)
        bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))
        self.register_buffer("queries", torch.empty(k, dim).uniform_(-bound, bound))
        self.momentum = momentum

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:             # [n, dim] -> [k, dim]
        heads = self.heads
        q = self.to_q(self.norm(self.queries.clone())).unflatten(-1, (heads, -1)).transpose(0, 1)
        k, v = (t.unflatten(-1, (heads, -1)).transpose(0, 1) for t in self.to_kv(self.norm(tokens)).chunk(2, -1))
        attn = self.drop(torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1))
        merged = self.to_out((attn @ v).transpose(0, 1).flatten(1))
        if self.training:
            with torch.no_grad():
                self.queries.mul_(self.momentum).add_((1 - self.momentum) * merged.detach())
        return merged


def embedding_dim(model: nn.Module) -> int:
    """Width of the model's instance embeddings: the output of the last Linear in its `embedding_module`."""
    linears = [m for m in getattr(model, model.embedding_module).modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


@contextmanager
def embedded_input(model: nn.Module):
    """The model's forward on already-embedded instances: its `embedding_module` is bypassed meanwhile."""
    name = model.embedding_module
    layer = getattr(model, name)
    setattr(model, name, nn.Identity())
    try:
        yield
    finally:
        setattr(model, name, layer)


# The defaults each version's official command uses: v1 README, C16/ABMIL (random masking 0.5, r_h 0.01 of
# which hr 0.5 masked, cosine decay of r_h, cl_alpha 0.1); v2 (`scoring="cam"`, master branch configs):
# high-score masking only (no random masking), hr 1, no decay, the consistency weight (`aux_alpha`) 0.5.
VERSION_DEFAULTS = {
    "v1": {"mask_ratio": 0.5, "mask_ratio_hr": 0.5, "mrh_sche": True, "cl_alpha": 0.1},
    "v2": {"mask_ratio": 0.0, "mask_ratio_hr": 1.0, "mrh_sche": False, "cl_alpha": 0.5},
}


@register_strategy("mhim", paper="Tang et al., ICCV 2023 (arXiv 2307.15254); v2 IJCV 2025",
                   summary="EMA teacher masks the hard (top-attention) instances; consistency loss")
class MHIM(Strategy):
    """MHIM-MIL (v1 paper, Sec. 3; v2 for CAM scoring and random merge). A momentum teacher (same architecture,
    no gradients, updated only by EMA after each optimizer step: T = mm T + (1 - mm) S) scores every instance of
    the whole bag; the student trains on the bag with the hard (highest-scoring) instances masked out, with L =
    alpha_cls L_model(S) + cl_alpha SoftCE(z_S / temp_s, z_T / temp_t) on the bag embeddings. Inference is the
    student on all instances.

    Defaults are the official v1 C16/ABMIL command (README): random masking `mask_ratio` 0.5, mask_ratio_h 0.01
    with cosine decay to 0 (`mrh_sche`), of which mask_ratio_hr 0.5 are masked, cl_alpha 0.1, temp_t 0.1,
    temp_s 1, mm 0.9999 (cosine to 1 with `mm_sche`), `init_stu_type` "fc" (the student's instance-embedding
    layer, the official `patch_to_emb`, starts from the teacher's; "all" copies every weight, "none" none).
    v2 options: `scoring="cam"`, which also switches the unset masking defaults to v2's (VERSION_DEFAULTS: no
    random masking, hr 1, no decay, cl_alpha 0.5); CAM scores s_i = max_c softmax_c(W_c a_i h_i + b_0) (see
    `cam_scores`: needs a model that exposes its instance embeddings and `classifier`, e.g. abmil) and random
    merge (`merge_ratio`, `merge_k`, `merge_mm`; in the model's instance-embedding space, as official; off at
    inference, as `merge_test`).

    Teacher: `teacher_init` = the folder of a finished plain run of the same model with the same splits; each
    fold's teacher starts from that run's model of the same fold (checked: its test slides must be this fold's,
    or the teacher would have trained on them), the official recipe. Without it, the fold first trains plainly
    for `baseline_epochs` (default: half the epochs, so the teacher is a trained baseline and not a 3-epoch
    one) and that model becomes the teacher; the student then goes on from it (it already is the teacher, so
    `init_stu_type` has nothing to copy). TransMIL's scores are the head-averaged class-token attention (the
    official code fuses heads by voting). """

    def __init__(self, model, mask_ratio_h: float = 0.01, mask_ratio_hr: float | None = None, mask_ratio_l: float = 0.0,
                 mask_ratio: float | None = None, mrh_sche: bool | None = None, cl_alpha: float | None = None,
                 alpha_cls: float = 1.0,
                 temp_t: float = 0.1, temp_s: float = 1.0, mm: float = 0.9999, mm_sche: bool = False,
                 teacher_init: str | None = None, init_stu_type: str = "fc", baseline_epochs: int | None = None,
                 scoring: str = "attention", merge_ratio: float | None = None, merge_k: int = 1,
                 merge_mm: float = 0.9999):
        super().__init__(model)
        if scoring not in ("attention", "cam"):
            raise ValueError(f"mhim scoring must be 'attention' or 'cam', not {scoring!r}")
        version = VERSION_DEFAULTS["v2" if scoring == "cam" else "v1"]      # what the user leaves unset
        mask_ratio_hr = version["mask_ratio_hr"] if mask_ratio_hr is None else mask_ratio_hr
        mask_ratio = version["mask_ratio"] if mask_ratio is None else mask_ratio
        mrh_sche = version["mrh_sche"] if mrh_sche is None else mrh_sche
        cl_alpha = version["cl_alpha"] if cl_alpha is None else cl_alpha
        # shares of a bag: masked ones below 1 (else nothing is left), of the hard instances up to 1, kept by
        # merging above 0
        ranges = {"mask_ratio_h": (mask_ratio_h, "[0, 1)", 0 <= mask_ratio_h < 1),
                  "mask_ratio_l": (mask_ratio_l, "[0, 1)", 0 <= mask_ratio_l < 1),
                  "mask_ratio": (mask_ratio, "[0, 1)", 0 <= mask_ratio < 1),
                  "mask_ratio_hr": (mask_ratio_hr, "[0, 1]", 0 <= mask_ratio_hr <= 1),
                  "merge_ratio": (merge_ratio, "(0, 1]", merge_ratio is None or 0 < merge_ratio <= 1)}
        outside = [f"{k}={v} (must be in {span})" for k, (v, span, ok) in ranges.items() if not ok]
        if outside:
            raise ValueError(f"mhim {', '.join(outside)}: a share of the bag's instances")
        if init_stu_type not in ("fc", "all", "none"):
            raise ValueError(f"mhim init_stu_type must be 'fc', 'all' or 'none', not {init_stu_type!r}")
        if merge_ratio is not None and model.embedding_module is None:
            raise ValueError(f"mhim merge works in the model's instance-embedding space; {type(model).__name__} has "
                             f"no separate instance-embedding layer (abmil, clam_sb, clam_mb, acmil, transmil, "
                             f"mambamil and lbmamba have one)")
        self.mask_ratio_h, self.mask_ratio_hr, self.mask_ratio_l, self.mask_ratio = (
            mask_ratio_h, mask_ratio_hr, mask_ratio_l, mask_ratio)
        self.mrh_sche, self.cl_alpha, self.alpha_cls = mrh_sche, cl_alpha, alpha_cls
        self.temp_t, self.temp_s, self.mm, self.mm_sche = temp_t, temp_s, mm, mm_sche
        self.teacher_init, self.init_stu_type, self.scoring = teacher_init, init_stu_type, scoring
        self.baseline_epochs = baseline_epochs
        self.merge_ratio = merge_ratio
        self.merge = Merge(embedding_dim(model), merge_k, merge_mm) if merge_ratio is not None else None
        self.step, self.total_steps, self.active, self.switch_epoch = 0, 1, False, 0
        self._teacher = Detached()  # outside the module tree: not saved, not optimised, not moved

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher.module

    # -- hooks ---------------------------------------------------------------------------------
    def fit_start(self, context) -> None:
        super().fit_start(context)
        cfg = context.cfg
        self.total_steps = max(1, cfg.epochs * math.ceil(math.ceil(len(context.train_ds) / cfg.batch_size) / cfg.accum_steps))
        self.step = 0
        self.switch_epoch = self.baseline_epochs if self.baseline_epochs is not None else max(1, cfg.epochs // 2)
        if self.teacher_init:
            self._set_teacher(self._baseline_state(RunDir(self.teacher_init), context))
            self._init_student()
            self.active = True

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        super().epoch_start(epoch, n_epochs)
        if self.teacher is None and epoch >= self.switch_epoch:
            log.info("mhim: the student of epoch %d becomes the teacher", epoch)
            self._set_teacher(self.model.state_dict())
            self.active = True

    def step_end(self) -> None:
        super().step_end()
        self.step += 1
        if self.teacher is None:
            return
        mm = cosine_ramp(self.mm, 1.0, self.step, self.total_steps) if self.mm_sche else self.mm
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.model.parameters()):
                t.mul_(mm).add_(s.detach(), alpha=1 - mm)
            for t, s in zip(self.teacher.buffers(), self.model.buffers()):
                t.copy_(s)

    # -- teacher -------------------------------------------------------------------------------
    def _set_teacher(self, state: dict) -> None:
        teacher = copy.deepcopy(self.model)
        teacher.load_state_dict(state)
        teacher.requires_grad_(False).eval()
        self._teacher.module = teacher

    def _init_student(self) -> None:
        """The official `init_stu_type`: "fc" loads the teacher's instance-embedding layer into the student."""
        if self.init_stu_type == "all":
            self.model.load_state_dict(self.teacher.state_dict())
        elif self.init_stu_type == "fc" and self.model.embedding_module is not None:
            name = self.model.embedding_module
            getattr(self.model, name).load_state_dict(getattr(self.teacher, name).state_dict())

    def _baseline_state(self, run: RunDir, context) -> dict:
        fold_dir = run.fold_dir(context.fold)
        meta_path = fold_dir / "model.json"
        if not meta_path.is_file():
            raise InputError(f"mhim teacher_init: {meta_path} not found; give the folder of a finished "
                             f"`slidemil train` run of the same model and splits")
        meta = run.fold_meta(context.fold)
        ours = context.cfg
        if meta["model"] != ours.model or (meta.get("model_args") or {}) != ours.model_args \
                or meta.get("reembed") != ours.reembed:
            raise InputError(f"mhim teacher_init: {fold_dir} holds {meta['model']} {meta.get('model_args')}, "
                             f"not {ours.model} {ours.model_args}; the teacher must be the same model")
        mine = context.run_dir
        if mine is not None:
            theirs = run.splits_path
            if not theirs.is_file() or not mine.splits_path.is_file() \
                    or run.test_ids(context.fold) != mine.test_ids(context.fold):
                raise InputError(f"mhim teacher_init: {theirs} does not have this run's test slides in fold "
                                 f"{context.fold}; its model may have trained on them (leakage). Train the "
                                 f"baseline with the same --folds, --seed and labels (or --splits)")
        return inference_state(load_file(str(fold_dir / "model.safetensors"), device=str(context.device)), meta)

    # -- training forward ------------------------------------------------------------------------
    def _scores(self, out: MILOutput) -> torch.Tensor:
        if self.scoring == "attention":
            return out.instance_scores
        h = needs(out.instance_embeddings, "instance embeddings", "mhim (scoring='cam')", self.model)
        clf = getattr(self.teacher, "classifier", None)
        if not isinstance(clf, nn.Linear):
            raise ValueError(f"mhim scoring='cam' needs a model whose bag embedding is read by one linear "
                             f"`classifier` (e.g. abmil); {type(self.model).__name__} has none")
        return cam_scores(out.instance_scores, h, clf)

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        if not (self.training and torch.is_grad_enabled() and self.active):
            return self.model(x, mask, coords)
        mask = full_mask(x, mask)
        with torch.no_grad():
            t_out = self.teacher(x, mask, coords)
        ratio_h = cosine_ramp(self.mask_ratio_h, 0.0, self.step, self.total_steps) if self.mrh_sche else self.mask_ratio_h
        keep = hard_instance_mask(self._scores(t_out), mask, ratio_h, self.mask_ratio_hr, self.mask_ratio_l,
                                  self.mask_ratio)
        if self.merge is not None:
            out = self._merged_forward(x, keep)
        else:
            out = self.model(x, keep, coords)
        out.extras["teacher_embedding"] = t_out.bag_embedding
        return out

    def _merged_forward(self, x, keep) -> MILOutput:
        """v2: embed, keep a random `merge_ratio` of the unmasked tokens, merge the rest into k tokens, run
        the rest of the model on them (positions change, so coordinates are not passed on)."""
        h = getattr(self.model, self.model.embedding_module)(x)
        rows = []
        for b in range(len(h)):
            idx = keep[b].nonzero()[:, 0]
            idx = idx[torch.randperm(len(idx), device="cpu").to(idx.device)]
            n_keep = max(1, int(round(len(idx) * self.merge_ratio)))
            kept, rest = h[b, idx[:n_keep]], h[b, idx[n_keep:]]
            merged = self.merge(rest) if len(rest) else h.new_zeros(0, h.shape[-1])
            rows.append(torch.cat([kept, merged]))
        n = max(len(r) for r in rows)
        packed = h.new_zeros(len(h), n, h.shape[-1])
        new_mask = torch.zeros(len(h), n, dtype=torch.bool, device=h.device)
        for b, r in enumerate(rows):
            packed[b, :len(r)], new_mask[b, :len(r)] = r, True
        with embedded_input(self.model):
            return self.model(packed, new_mask, None)

    def loss(self, out, target, task_loss):
        loss = self.alpha_cls * self.model.loss(out, target, task_loss)
        if self.cl_alpha > 0 and "teacher_embedding" in out.extras:   # only once MHIM is active
            z_s = needs(out.bag_embedding, "bag embedding", "mhim", self.model)
            z_t = out.extras["teacher_embedding"]
            loss = loss + self.cl_alpha * soft_cross_entropy(z_s.float(), z_t.float(), self.temp_s, self.temp_t)
        return loss

