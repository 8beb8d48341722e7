"""Train one model on one fold: AdamW, warm-up + cosine (or plateau), early stopping on the inner
validation split only, gradient accumulation, bf16 autocast on GPU, padded mini-batches."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, WeightedRandomSampler

from slidemil.data.bags import BagDataset, collate_bags
from slidemil.errors import TrainingError
from slidemil.evaluate.metrics import classification_metrics
from slidemil.models.base import MILModel
from slidemil.rundir import RunDir
from slidemil.train.config import TrainConfig
from slidemil.utils.device import autocast

log = logging.getLogger(__name__)


def make_task_loss(labels: np.ndarray, n_classes: int, class_weights: str, device) -> callable:
    """Cross-entropy, optionally weighted n / (C * n_c) ("balanced", as scikit-learn)."""
    weight = None
    if class_weights == "balanced":
        counts = np.bincount(labels, minlength=n_classes).astype(float)
        weight = torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    return lambda logits, target: F.cross_entropy(logits.float(), target, weight=weight)


@dataclass
class Inference:
    ids: list[str]
    probs: np.ndarray             # [n, C]
    loss: float
    instance_scores: list[np.ndarray]


@torch.no_grad()
def infer(model: MILModel, dataset: BagDataset, device, task_loss=None, keep_scores: bool = False,
          num_workers: int = 0) -> Inference:
    """Whole bags, one at a time, eval mode. The loss is the plain task loss (what validation monitors)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_bags, num_workers=num_workers)
    ids, probs, losses, scores = [], [], [], []
    for batch in loader:
        x = batch["x"].to(device)
        with autocast(device):
            out = model(x, batch["mask"].to(device), batch["coords"])
        logits = out.logits.float()
        if task_loss is not None:
            losses.append(float(task_loss(logits, batch["y"].to(device))))
        ids += batch["ids"]
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        if keep_scores:
            s = out.instance_scores
            scores.append(s[0].float().cpu().numpy() if s is not None else None)
    return Inference(ids, np.concatenate(probs), float(np.mean(losses)) if losses else float("nan"), scores)


def _scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 3))
    if cfg.scheduler == "none":
        return None
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class FitContext:
    """What `MILModel.fit_start` may need: the training data, the run config, where it runs."""

    train_ds: BagDataset
    cfg: TrainConfig
    device: torch.device
    fold: int = 0
    run_dir: RunDir | None = None  # the run being trained (strategies check an earlier run against it)
    encoder: str | None = None    # the features' encoder name, when the feature files record it


def param_groups(model: MILModel, weight_decay: float) -> list[dict]:
    """AdamW groups: the parameters named by `model.no_weight_decay()` (SSM A_log, D, dt bias) get none."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclass
class FitResult:
    state: dict
    history: pd.DataFrame
    best_epoch: int


def fit(model: MILModel, train_ds: BagDataset, val_ds: BagDataset | None, cfg: TrainConfig,
        device: torch.device, generator: torch.Generator, progress=None, fold: int = 0,
        run_dir=None, encoder: str | None = None) -> FitResult:
    """Train; pick the epoch by the validation split (never the test fold). Without a validation
    split the last epoch is kept."""
    model.to(device)
    model.fit_start(FitContext(train_ds, cfg, device, fold, run_dir, encoder))
    n_classes = model.n_outputs
    labels = train_ds.labels()
    task_loss = make_task_loss(labels, n_classes, cfg.class_weights, device)
    if cfg.balanced_sampling:
        counts = np.bincount(labels, minlength=n_classes)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        sampler, shuffle = WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator), None
    else:
        sampler, shuffle = None, True
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=shuffle, sampler=sampler,
                        collate_fn=collate_bags, num_workers=cfg.num_workers, generator=generator,
                        drop_last=False)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps = math.ceil(len(loader) / cfg.accum_steps)
    sched = _scheduler(opt, cfg, steps)
    sign = 1.0 if cfg.monitor == "val_loss" else -1.0
    best, best_epoch, best_state, stale, rows = math.inf, -1, None, 0, []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        model.epoch_start(epoch, cfg.epochs)
        total, n_seen = 0.0, 0
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            with autocast(device):
                out = model(batch["x"].to(device), batch["mask"].to(device), batch["coords"])
                loss = model.loss(out, batch["y"].to(device), task_loss)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {float(loss.detach())} at epoch {epoch + 1} (bag(s) "
                                    f"{', '.join(batch['ids'])}); lower --lr or check these features")
            (loss / cfg.accum_steps).backward()
            total += float(loss.detach()) * len(batch["ids"])
            n_seen += len(batch["ids"])
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.step_end()
                if sched is not None and cfg.scheduler == "cosine":
                    sched.step()
        row = {"epoch": epoch + 1, "train_loss": total / max(1, n_seen), "val_loss": float("nan"),
               "val_metric": float("nan"), "lr": opt.param_groups[0]["lr"]}
        if val_ds is not None and len(val_ds):
            res = infer(model, val_ds, device, task_loss)
            row["val_loss"] = res.loss
            row["val_metric"] = classification_metrics(val_ds.labels(), res.probs)["auroc"]
            if sched is not None and cfg.scheduler == "plateau":
                sched.step(res.loss)
            score = sign * (row["val_loss"] if cfg.monitor == "val_loss" else row["val_metric"])
            if not math.isfinite(score):
                score = math.inf
            if score < best or best_state is None:
                best, best_epoch, best_state, stale = score, epoch + 1, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if progress is not None:
            progress(row)
        if val_ds is not None and len(val_ds) and stale >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            log.info("early stop at epoch %d (best %d)", epoch + 1, best_epoch)
            break
    if best_state is None:
        best_state, best_epoch = copy.deepcopy(model.state_dict()), len(rows)
    model.load_state_dict(best_state)
    return FitResult(best_state, pd.DataFrame(rows), best_epoch)
