"""CUDA's bf16 autocast, reproduced on the CPU, so that CI (which has no GPU) catches the dtype faults that
crash a training step on a GPU.

CPU autocast already runs the matrix products (linear, matmul, bmm, conv) in bf16, as CUDA's does. It does
not share CUDA's second list: the ops that CUDA autocast runs in float32 whatever their input (softmax, sum,
exp, log, layer_norm, cross-entropy, ...; "CUDA Ops that can autocast to float32" in PyTorch's AMP docs).
Those return float32 from a bf16 input on a GPU and bf16 on a CPU, so code such as `bf16_buffer[idx] =
softmax(bf16)` works on a CPU and fails on a GPU ("Index put requires the source and destination dtypes
match"). `cuda_like_autocast()` adds that list with a TorchFunctionMode that casts the bf16 arguments of
those ops to float32, which is what CUDA autocast does."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# The float32 list of PyTorch's AMP documentation (CUDA), by function name (torch.X, Tensor.X and
# torch.nn.functional.X alike).
CUDA_FP32_OPS = frozenset("""
__pow__ __rpow__ __rdiv__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh cosine_embedding_loss
cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 group_norm hinge_embedding_loss
kl_div l1_loss layer_norm log log_softmax log10 log1p log2 margin_ranking_loss mse_loss multilabel_margin_loss
multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod reciprocal rsqrt sinh
smooth_l1_loss soft_margin_loss softmax softmin softplus sum renorm tan triplet_margin_loss
""".split())

_LOW = (torch.bfloat16, torch.float16)


def _up(value):
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_up(v) for v in value)
    return value


class _Float32List(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            args, kwargs = _up(args), {k: _up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_like_autocast():
    """bf16 autocast on the CPU with CUDA's float32 list: a model that runs under this runs under CUDA's."""
    with torch.autocast("cpu", dtype=torch.bfloat16), _Float32List():
        yield


def cuda_like(device: torch.device):
    """Drop-in for `slidemil.utils.device.autocast` in tests: the CUDA-like bf16 autocast on any device."""
    return cuda_like_autocast()
