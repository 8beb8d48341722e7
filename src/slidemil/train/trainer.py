"""Train one model on one fold: AdamW, warm-up + cosine (or plateau), epoch selection and early stopping
on the inner validation split only (smoothed over epochs, never before min_epochs), gradient
accumulation, bf16 autocast on GPU, padded mini-batches or packs (`--pack-len`), data-parallel over
torchrun's ranks (`--ddp data`: every rank validates alike, so all select and stop at the same epoch)."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from slidemil.data.bags import BagDataset, collate_bags, collate_list
from slidemil.errors import TrainingError
from slidemil.models.base import MILModel
from slidemil.rundir import RunDir
from slidemil.tasks import Task, create_task
from slidemil.train.config import TrainConfig
from slidemil.utils.device import autocast, to_device
from slidemil.utils.dist import average_gradients, broadcast_parameters, join_process_group, rank_world

log = logging.getLogger(__name__)


@dataclass
class Inference:
    ids: list[str]
    logits: np.ndarray            # [n, n_outputs]
    instance_scores: list[np.ndarray]

    @property
    def probs(self) -> np.ndarray:
        """Softmax of the logits [n, C] (classification)."""
        return torch.softmax(torch.from_numpy(self.logits), 1).numpy()


@torch.no_grad()
def infer(model: MILModel, dataset: BagDataset, device, keep_scores: bool = False, num_workers: int = 0,
          chunk: int | None = None) -> Inference:
    """Whole bags, one at a time, eval mode. A bag of more than `chunk` instances is scored chunk by chunk
    (`--max-instances-infer`) when the model can (`model.streams`; the same outputs, one chunk's activations
    at a time); other models take it whole."""
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_bags,
                        num_workers=loader_workers(dataset, num_workers))
    ids, logits, scores = [], [], []
    for batch in loader:
        ids += batch["ids"]
        lg, s = _score(model, batch, device, chunk, keep_scores)
        logits.append(lg)      # kept on the device: one copy to the host at the end
        scores.append(s)
        del batch              # before the loader reads the next bag
    return Inference(ids, torch.cat(logits).cpu().numpy(), scores if keep_scores else [])


def _score(model: MILModel, batch: dict, device, chunk: int | None, keep_scores: bool):
    """(logits, instance scores or None) of one bag; its activations are freed on return."""
    x = batch["x"].to(device)
    with autocast(device):
        if chunk and model.streams and x.shape[1] > chunk:
            out = model.forward_stream(x[0].split(chunk))
        else:
            out = model(x, batch["mask"].to(device), batch["coords"])
    s = out.instance_scores
    return out.logits.detach().float(), (s[0].float().cpu().numpy() if keep_scores and s is not None else None)


def loader_workers(dataset: BagDataset, asked: int) -> int:
    """DataLoader workers: none when the dataset's bags live on a GPU (worker processes cannot hold CUDA
    tensors, and there is nothing left to read)."""
    return 0 if dataset.cache is not None and dataset.cache.device is not None else asked


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


_FUSED_ADAM = {"cpu", "cuda"}    # devices with torch's fused AdamW kernel


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


def _training_forward(model: MILModel, batch: dict, device, pack_len: int | None):
    """One training forward: packed (`--pack-len`: one prediction per bag of the packs) or padded."""
    if pack_len:
        return model.forward_bags([x.to(device) for x in batch["xs"]], pack_len)
    return model(batch["x"].to(device), batch["mask"].to(device), batch["coords"])


def _backward(model: MILModel, batch: dict, device, pack_len: int | None, task_loss, accum_steps: int) -> torch.Tensor:
    """One step's forward and backward; returns its loss, detached. The outputs (instance-level tensors of
    the bag's size) are freed on return, before the next bag is read or the validation pass runs."""
    model.batch_start(batch["ids"])
    with autocast(device):
        out = _training_forward(model, batch, device, pack_len)
        loss = model.loss(out, to_device(batch["y"], device), task_loss)
    (loss / accum_steps).backward()
    return loss.detach().float()


def auto_pack_len(model: MILModel, train_ds: BagDataset, cfg: TrainConfig, device: torch.device) -> int | None:
    """On a GPU, steps of several bags (`--batch-size` > 1) train on packs when the model (and strategy) can:
    the pack length is the longest training bag, so no bag is cut and the results equal padded training
    (each bag pooled within its own tokens; tests/nn/test_packing.py) on dense tensors without the padding.
    None (padded batches) on a CPU, with one bag a step, or for a model that reads whole bags."""
    if cfg.pack_len or device.type != "cuda" or cfg.batch_size < 2 or not model.packable or not len(train_ds):
        return cfg.pack_len
    longest = max(train_ds.lengths())
    return min(longest, cfg.max_instances) if cfg.max_instances else longest


SMALL_BAG = 2000     # median instances a bag below which one bag a step leaves a GPU waiting on the host
_hinted = False


def hint_small_bags(model: MILModel, train_ds: BagDataset, cfg: TrainConfig, device: torch.device) -> str | None:
    """On a GPU at one bag a step, bags of a few hundred instances are paced by the host's Python and kernel
    launches, not the GPU (H200: a 48-patient CV of ~200-instance bags took 32 s, 26 s on 2 CPU cores;
    docs/benchmarks.md). Says so, with the remedy, when the median training bag is small; looks once per
    process (the first fold's bags: the cache keeps them for its first epoch)."""
    global _hinted
    if _hinted or device.type != "cuda" or cfg.batch_size > 1 or cfg.pack_len or not model.packable or not len(train_ds):
        return None
    _hinted = True
    median = float(np.median(train_ds.lengths()))
    if median >= SMALL_BAG:
        return None
    text = (f"bags of ~{median:.0f} instances at one bag a step: the GPU waits on the host; --batch-size 8 trains on "
            f"packs, several bags a step (a different optimisation than the measured one-bag defaults; docs/scale.md)")
    log.info(text)
    return text


class RankShare(Sampler):
    """Rank r's share of an epoch's order (`--ddp data`): every rank draws the same order from the same
    seeded generator and takes items r, r + K, ...; the order is padded by repeating its start so that all
    ranks take the same number of steps (as torch's DistributedSampler)."""

    def __init__(self, order: Sampler, rank: int, world: int):
        self.order, self.rank, self.world = order, rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.world)

    def __iter__(self):
        order = list(self.order)
        order += order[: len(self) * self.world - len(order)]
        return iter(order[self.rank::self.world])


def _epoch_loss(losses: list[torch.Tensor], step_ids: list[list[str]], epoch: int) -> float:
    """The epoch's mean loss per bag, read from the device once; the first step whose loss was not finite
    is a TrainingError naming its bags."""
    if not losses:
        return float("nan")
    values = torch.stack(losses).cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        k = int(bad[0, 0])
        raise TrainingError(f"loss became {float(values[k])} at epoch {epoch + 1} (bag(s) {', '.join(step_ids[k])}); "
                            f"lower --lr or check these features")
    sizes = torch.tensor([len(ids) for ids in step_ids], dtype=values.dtype)
    return float((values * sizes).sum() / sizes.sum())


@dataclass
class FitResult:
    state: dict
    history: pd.DataFrame
    best_epoch: int


def fit(model: MILModel, train_ds: BagDataset, val_ds: BagDataset | None, cfg: TrainConfig,
        device: torch.device, generator: torch.Generator, progress=None, fold: int = 0,
        run_dir=None, encoder: str | None = None, task: Task | None = None, task_state: dict | None = None) -> FitResult:
    """Train; pick the epoch by the validation split (never the test fold). Without a validation
    split the last epoch is kept. `task` (default: the one `cfg` names) owns the loss and the validation
    metric; `task_state` is what it fitted on this fold's training rows (survival bins, target scaling)."""
    task = task or create_task(cfg)
    state = task_state or {}
    model.to(device)
    if cfg.compile:   # in place: the weights keep their names, so checkpoints load without the compiler
        model.compile(dynamic=True)
    context = FitContext(train_ds, cfg, device, fold, run_dir, encoder)
    model.fit_start(context)
    labels = train_ds.labels()
    task_loss = task.loss(state, labels, device, model.n_outputs)
    if cfg.balanced_sampling:
        weights = torch.as_tensor(task.balanced_weights(labels), dtype=torch.double)
        sampler, shuffle = WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator), None
    else:
        sampler, shuffle = None, True
    rank, world = rank_world() if cfg.ddp == "data" else (0, 1)
    if world > 1:   # data-parallel: the same model on every rank, each rank on its share of every step
        join_process_group(device)
        broadcast_parameters(model)
        torch.manual_seed(cfg.seed + fold + 100_003 * rank)     # each rank its own dropout and masking draws
        sampler, shuffle = RankShare(sampler or RandomSampler(train_ds, generator=generator), rank, world), None
    pack_len = auto_pack_len(model, train_ds, cfg, device)
    hint_small_bags(model, train_ds, cfg, device)
    if pack_len and not cfg.pack_len:
        log.info("training on packs of %d instances (--batch-size %d on a GPU; results as padded batches)", pack_len,
                 cfg.batch_size)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=shuffle, sampler=sampler,
                        collate_fn=collate_list if pack_len else collate_bags,
                        num_workers=loader_workers(train_ds, cfg.num_workers),
                        generator=generator, drop_last=False)
    # the fused kernel updates every tensor in one pass; the same update rule, 5x faster than the default
    # per-tensor loop on CPU (measured, 1 thread: 7 vs 38 ms a step for a 2M-parameter Mamba, 0.4 vs 2.1 ms
    # for ABMIL on 32-d features)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type in _FUSED_ADAM)
    steps = math.ceil(len(loader) / cfg.accum_steps)
    sched = _scheduler(opt, cfg, steps)
    sign = 1.0 if cfg.monitor == "val_loss" else -1.0    # every task metric is higher-is-better
    select = cfg.select == "best" and val_ds is not None and len(val_ds) > 0
    first = min(cfg.min_epochs, cfg.epochs)               # the earliest epoch that may be selected
    best, best_epoch, best_state, stale, rows, watched = math.inf, -1, None, 0, [], []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        model.epoch_start(epoch, cfg.epochs)
        # on a GPU the losses stay on the device: no host sync per step, so the host queues the next step
        # (and its bag's copy) while the GPU runs this one; they are read once, at the epoch's end
        losses, step_ids = [], []
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            step_ids.append(batch["ids"])
            losses.append(_backward(model, batch, device, pack_len, task_loss, cfg.accum_steps))
            del batch         # before the loader reads the next bag: one bag in memory at a time, not two
            if device.type == "cpu" and not torch.isfinite(losses[-1]):   # free on a CPU: stop at once
                _epoch_loss(losses, step_ids, epoch)
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
                if world > 1:
                    average_gradients([p for p in model.parameters() if p.requires_grad])
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.step_end()
                if sched is not None and cfg.scheduler == "cosine":
                    sched.step()
        train_loss = _epoch_loss(losses, step_ids, epoch)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": float("nan"),
               "val_metric": float("nan"), "lr": opt.param_groups[0]["lr"]}
        if getattr(task_loss, "empty_batches", 0):
            log.info("epoch %d: %d batch(es) without an event added nothing to the Cox loss", epoch + 1,
                     task_loss.empty_batches)
            task_loss.empty_batches = 0
        if val_ds is not None and len(val_ds):
            res = infer(model, val_ds, device, chunk=cfg.max_instances_infer)
            row["val_loss"] = task.val_loss(task_loss, torch.from_numpy(res.logits).to(device), val_ds.labels())
            row["val_metric"] = task.val_metric(state, res.logits, val_ds.labels())
            if sched is not None and cfg.scheduler == "plateau":
                sched.step(row["val_loss"])
            value = sign * (row["val_loss"] if cfg.monitor == "val_loss" else row["val_metric"])
            watched.append(value if math.isfinite(value) else math.inf)
            # a small validation split is noisy from epoch to epoch: select on the trailing moving average
            score = float(np.mean(watched[-cfg.smooth:]))
            row["val_smoothed"] = sign * score
            if select and epoch + 1 >= first:
                if score < best or best_state is None:
                    best, best_epoch, best_state, stale = score, epoch + 1, copy.deepcopy(model.state_dict()), 0
                else:
                    stale += 1
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if progress is not None:
            progress(row)
        if select and stale >= cfg.patience:
            log.info("early stop at epoch %d (best %d)", epoch + 1, best_epoch)
            break
    if best_state is None:   # --select last, or no validation split: the last epoch
        best_state, best_epoch = copy.deepcopy(model.state_dict()), len(rows)
    model.load_state_dict(best_state)
    model.fit_end(context)
    return FitResult(model.state_dict(), pd.DataFrame(rows), best_epoch)
