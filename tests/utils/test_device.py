"""Which device a process computes on: each torchrun rank its own GPU, a device torch cannot use one line."""

from __future__ import annotations

import pytest
import torch

from slidemil.errors import InputError
from slidemil.utils.device import resolve_device


@pytest.fixture()
def four_gpus(monkeypatch):
    """A machine torch sees 4 CUDA devices on; records the current device each call sets."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    return chosen


def test_each_torchrun_rank_takes_its_own_gpu(four_gpus, monkeypatch):
    """`torchrun --nproc_per_node 4 -m slidemil preprocess` put all four ranks on cuda:0 (4x slower than the
    docs promise, and `--ddp data`'s NCCL refuses two ranks on one GPU): a rank now takes cuda:LOCAL_RANK and
    makes it the current device (Triton kernels launch there)."""
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2) and four_gpus == [torch.device("cuda", 2)]
    assert resolve_device("cuda") == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "5")                     # more ranks than GPUs: they share, round robin
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)    # an explicit GPU is kept
    with pytest.raises(InputError, match="torch sees 4 CUDA device"):
        resolve_device("cuda:4")


def test_outside_torchrun_the_default_gpu_is_left_alone(four_gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda") and four_gpus == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")                     # one GPU: nothing to choose
    assert resolve_device("cuda") == torch.device("cuda") and four_gpus == []


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="torch sees no CUDA device; use --device cpu"):
        resolve_device("cuda")
