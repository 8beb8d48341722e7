"""Feature standardisation fitted on a fold's training bags: z = (x - mean) / std per feature dimension.

Unscaled descriptors (classic MIL benchmarks, some encoders' outlier dimensions) make training losses start
at ~10 and validation losses jump by 10x between epochs; small cohorts cannot average that out. The
statistics come from the training bags only (never validation or test), are saved with the fold's weights
and applied again by every consumer of the model (predict, heatmaps, certify) through `Standardized`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from slidemil.models.base import MILModel, MILOutput, Wrapped

KEYS = ("standardize.mean", "standardize.std")
UNIT_RANGE = (0.2, 5.0)       # RMS feature value regarded as "near unit scale"
SPREAD_LIMIT = 50.0           # largest / median per-dimension std beyond which dimensions dwarf each other
_ROWS = 4096                  # rows per float64 block when fitting


@dataclass
class Scaling:
    mean: torch.Tensor   # [D] float32
    std: torch.Tensor    # [D] float32, floored so constant dimensions stay finite

    @classmethod
    def fit(cls, bags: Iterable[torch.Tensor]) -> Scaling:
        """Per-dimension mean and std over every instance of `bags` (float64 sums, one pass)."""
        n, total, squares = 0, None, None
        for bag in bags:
            for x in bag.split(_ROWS):      # float64 a block of rows at a time: a 40k x 1024 bag would take 650 MB
                x = x.double()
                total = x.sum(0) if total is None else total + x.sum(0)
                squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
                n += len(x)
        mean = total / max(n, 1)
        std = (squares / max(n, 1) - mean * mean).clamp_min(0).sqrt()
        floor = max(float(std.max()) * 1e-6, 1e-8)
        return cls(mean.float().cpu(), std.clamp_min(floor).float().cpu())   # bags may live on a GPU

    def far_from_unit(self) -> bool:
        """True when the features are far from unit scale: RMS value outside UNIT_RANGE, or one dimension's
        spread over SPREAD_LIMIT times the median's."""
        rms = float((self.mean ** 2 + self.std ** 2).mean().sqrt())
        spread = float(self.std.max() / self.std.median())
        return not (UNIT_RANGE[0] <= rms <= UNIT_RANGE[1]) or spread > SPREAD_LIMIT

    def describe(self) -> str:
        rms = float((self.mean ** 2 + self.std ** 2).mean().sqrt())
        return f"RMS value {rms:.3g}, per-dimension std {float(self.std.min()):.3g}-{float(self.std.max()):.3g}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(KEYS, (self.mean, self.std)))

    @classmethod
    def pop_from(cls, state: dict) -> Scaling | None:
        """The scaling saved in a checkpoint's `state` (removed from it), or None."""
        if KEYS[0] not in state:
            return None
        return cls(state.pop(KEYS[0]).float(), state.pop(KEYS[1]).float())


class Standardized(Wrapped):
    """A trained model behind its fold's input standardisation (inference only: training standardises the
    bags in the dataset, so strategies see the bare model)."""

    def __init__(self, model: MILModel, scaling: Scaling):
        super().__init__(model)
        self.scaling = scaling

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        return self.model(self.scaling(x), mask, coords)

    def forward_packed(self, x, segments) -> MILOutput:
        return self.model.forward_packed(self.scaling(x), segments)

    def forward_stream(self, chunks) -> MILOutput:
        return self.model.forward_stream(self.scaling(c) for c in chunks)
