"""The model interface every aggregator follows (DESIGN.md, "The model interface")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MILOutput:
    logits: torch.Tensor                    # [B, n_outputs]
    instance_scores: torch.Tensor | None    # [B, N]: attention or instance logits; 0 at padded rows
    extras: dict = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class: `forward(x, mask, coords) -> MILOutput`, `loss(out, target, task_loss)`.

    x is [B, N, D]; mask is bool [B, N] with True for real instances. Padded rows never change the
    output. Models with auxiliary objectives override `loss`.
    """

    attention_scores = False  # True when instance_scores are an attention distribution over the bag

    def __init__(self, in_dim: int, n_outputs: int):
        super().__init__()
        self.in_dim = in_dim
        self.n_outputs = n_outputs

    def loss(self, out: MILOutput, target: torch.Tensor, task_loss: TaskLoss) -> torch.Tensor:
        return task_loss(out.logits, target)

    # Training hooks, called by the trainer; no-ops unless a model or strategy needs them.
    def fit_start(self, context) -> None:
        """Once before the first epoch (`context`: train.trainer.FitContext), e.g. to load a teacher."""

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        """Before each epoch (0-based), e.g. for curricula."""

    def step_end(self) -> None:
        """After each optimizer step, e.g. for EMA teachers."""


def pick_class(per_class: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Reduce per-class instance scores [B, C, N] to [B, N]: the positive class for binary tasks,
    otherwise the predicted class of each bag."""
    if per_class.shape[1] == 1:
        return per_class[:, 0]
    if logits.shape[1] == 2:
        return per_class[:, -1]
    idx = logits.argmax(1).view(-1, 1, 1).expand(-1, 1, per_class.shape[2])
    return per_class.gather(1, idx)[:, 0]
