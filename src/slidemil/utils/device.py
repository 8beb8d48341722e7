"""Where computation runs: the device a user asks for, and the mixed precision that goes with it."""

from __future__ import annotations

import os

import torch

from slidemil.errors import InputError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else CPU; `cpu`, `cuda` or `cuda:N` as asked. Under torchrun on a
    machine with several GPUs, `auto` and `cuda` take the GPU of the rank's LOCAL_RANK (torchrun starts a
    process per GPU: every rank took cuda:0), and a chosen GPU becomes the process's current device (Triton
    kernels and CUDA streams launch there). A device torch cannot use here (no GPU, a GPU index past the
    last, a misspelling) is one input error, raised before a run writes anything. Apple MPS is refused by
    name: no test of the suite runs there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name} was asked for, but torch sees no CUDA device; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is None and count > 1 and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % count)
        if device.index is not None:
            if device.index >= count:
                raise InputError(f"--device {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
            torch.cuda.set_device(device)
    elif device.type == "mps":
        raise InputError("--device mps: Apple GPUs are not supported yet (slidemil's tests run on CPU and CUDA); "
                         "use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: slidemil runs on cpu or cuda")
    return device


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
