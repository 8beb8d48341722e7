"""Where this process stands under torchrun (RANK, WORLD_SIZE, the run id every rank shares), and the
wait of one rank for files another rank writes. Ranks coordinate through files in the output folder,
so no process group (and no port) is needed for work that splits into independent pieces (folds, grid
cells); data-parallel training of one fold (`--ddp data`) joins torchrun's process group and averages
gradients over it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launch_id() -> str:
    """The id torchrun gives all ranks of one launch ("none" outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "none")


def wait_for(paths: list[Path], what: str, poll: float = 2.0, ready=None) -> None:
    """Block until every path exists (and `ready(path)` holds, when given); a rank that dies makes
    torchrun stop the others, so this never waits for a crashed rank."""
    def ok(p: Path) -> bool:
        return p.is_file() and (ready is None or ready(p))

    while not all(ok(p) for p in paths):
        log.info("waiting for %d %s of other ranks", sum(not ok(p) for p in paths), what)
        time.sleep(poll)


def join_process_group(device: torch.device) -> None:
    """Join torchrun's process group once (gloo on CPU, nccl on CUDA; address and port from torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def leave_process_group() -> None:
    """Leave the process group together: a barrier first, so no rank tears its connections down while
    another still finishes its last collective (a gloo rank that exits early can abort its peer), then
    destroy it while the interpreter is fully alive (not in exit-time finalisation)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers."""
    import torch.distributed as dist

    for t in module.state_dict().values():
        dist.broadcast(t, 0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (one all-reduce of the flattened gradients; a
    parameter that got no gradient on a rank counts as zero there, so all ranks step alike)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at:at + n].view_as(p).clone()
        at += n
