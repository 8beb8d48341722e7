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
