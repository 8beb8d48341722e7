"""Where computation runs: the device a user asks for, and the mixed precision that goes with it."""

from __future__ import annotations

import torch

from slidemil.errors import InputError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else CPU; an explicit `cuda` without one is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the precision the encoders and aggregators are trained in); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a host sync: a CPU tensor bound for a GPU is pinned first (torch caches pinned
    blocks) and copied asynchronously. A plain `.to("cuda")` from pageable memory waits for the GPU's queue to
    drain, which once a step (a bag's targets) keeps the host from running ahead of the GPU."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
