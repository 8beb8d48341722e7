"""The model interface every aggregator follows: `forward(x, mask, coords) -> MILOutput` and
`loss(out, target, task_loss)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from slidemil.nn.segments import Segments, pack_bags

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MILOutput:
    """What every aggregator returns.

    logits: [B, n_outputs]. instance_scores: [B, N] attention weights or instance logits (0 at padded
    rows), or None. bag_embedding: [B, E], the pooled representation the classifier reads (contrastive
    and distillation strategies use it), or None. instance_embeddings: [B, N, E'], the per-instance
    representation that is pooled, or None. extras: whatever the model's own loss needs.
    """

    logits: torch.Tensor
    instance_scores: torch.Tensor | None
    extras: dict = field(default_factory=dict)
    bag_embedding: torch.Tensor | None = None
    instance_embeddings: torch.Tensor | None = None


class MILModel(nn.Module):
    """Base class: `forward(x, mask, coords) -> MILOutput`, `loss(out, target, task_loss)`.

    x is [B, N, D]; mask is bool [B, N] with True for real instances. Padded rows never change the
    output. Models with auxiliary objectives override `loss`.
    """

    attention_scores = False  # True when instance_scores are an attention distribution over the bag
    # the submodule that embeds each instance before anything mixes them (None: no such layer); strategies that
    # work in the embedding space (MHIM-v2 merge, the MHIM student init) find it here
    embedding_module: str | None = None
    # True when `forward_packed` keeps every pooling inside its own bag (`--pack-len`, nn/segments.py)
    packable = False
    # said on every heatmap of the model when its instance scores are not where the evidence is
    scores_note: str | None = None
    # True when `forward_stream` scores a bag chunk by chunk (`--max-instances-infer`)
    streams = False

    def __init__(self, in_dim: int, n_outputs: int):
        super().__init__()
        self.in_dim = in_dim
        self.n_outputs = n_outputs

    def loss(self, out: MILOutput, target: torch.Tensor, task_loss: TaskLoss) -> torch.Tensor:
        return task_loss(out.logits, target)

    def forward_packed(self, x: torch.Tensor, segments: Segments) -> MILOutput:
        """Packed bags: their tokens end to end, x [T, D], `segments` naming each token's bag. Returns logits
        [n_bags, C] equal to running each bag alone, and instance_scores [T] in token order."""
        raise NotImplementedError(f"{type(self).__name__} cannot pool inside each bag of a pack")

    def forward_stream(self, chunks: Iterable[torch.Tensor]) -> MILOutput:
        """One bag given as consecutive chunks of instances ([n_i, D] each), for inference on bags too large
        for one pass: equal to `forward` on the whole bag (batch of one), holding one chunk's activations."""
        raise NotImplementedError(f"{type(self).__name__} cannot score a bag chunk by chunk")

    def forward_bags(self, bags: list[torch.Tensor], pack_len: int) -> MILOutput:
        """Training on a list of bags ([n_i, D] each) packed into packs of `pack_len` tokens: one prediction
        per bag. Strategies that pack their own way (PackMIL) override this."""
        packed = pack_bags(bags, pack_len)
        return self.forward_packed(packed.tokens, packed.segments)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters the optimizer must not decay (as timm's `model.no_weight_decay()`): those a
        submodule lists in its `no_weight_decay_names`, e.g. a state-space model's A_log and D."""
        names = set()
        for prefix, module in self.named_modules():
            for local in getattr(module, "no_weight_decay_names", ()):
                names.add(f"{prefix}.{local}" if prefix else local)
        return names

    # Training hooks, called by the trainer; no-ops unless a model or strategy needs them.
    def fit_start(self, context) -> None:
        """Once before the first epoch (`context`: train.trainer.FitContext), e.g. to load a teacher."""

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        """Before each epoch (0-based), e.g. for curricula."""

    def batch_start(self, ids: list[str]) -> None:
        """Before each training forward, with the ids of the batch's bags (INS keeps per-instance state)."""

    def step_end(self) -> None:
        """After each optimizer step, e.g. for EMA teachers."""

    def fit_end(self, context) -> None:
        """Once after the selected epoch's weights are back in place (the `fit_start` context), e.g. to fit an
        output calibration to the training bags."""


class Wrapped(MILModel):
    """A model around another (`.model`): the same forward, loss, attention flag and training hooks, which
    a wrapper overrides only where it adds something (re-embedding, a training strategy, standardisation)."""

    def __init__(self, model: MILModel, in_dim: int | None = None):
        super().__init__(model.in_dim if in_dim is None else in_dim, model.n_outputs)
        self.model = model
        self.attention_scores = model.attention_scores
        self.packable = model.packable
        self.streams = model.streams
        self.scores_note = model.scores_note

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        return self.model(x, mask, coords)

    def forward_packed(self, x, segments: Segments) -> MILOutput:
        return self.model.forward_packed(x, segments)

    def forward_stream(self, chunks) -> MILOutput:
        return self.model.forward_stream(chunks)

    def loss(self, out: MILOutput, target: torch.Tensor, task_loss: TaskLoss) -> torch.Tensor:
        return self.model.loss(out, target, task_loss)

    def fit_start(self, context) -> None:
        self.model.fit_start(context)

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        self.model.epoch_start(epoch, n_epochs)

    def batch_start(self, ids: list[str]) -> None:
        self.model.batch_start(ids)

    def step_end(self) -> None:
        self.model.step_end()

    def fit_end(self, context) -> None:
        self.model.fit_end(context)


def pick_class(per_class: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Reduce per-class instance scores [B, C, N] to [B, N]: the positive class for binary tasks,
    otherwise the predicted class of each bag."""
    if per_class.shape[1] == 1:
        return per_class[:, 0]
    if logits.shape[1] == 2:
        return per_class[:, -1]
    idx = logits.argmax(1).view(-1, 1, 1).expand(-1, 1, per_class.shape[2])
    return per_class.gather(1, idx)[:, 0]


def pick_class_packed(per_class: torch.Tensor, logits: torch.Tensor, segments: Segments) -> torch.Tensor:
    """`pick_class` for packed per-class scores [T, C]: each token takes its own bag's class."""
    if per_class.shape[-1] == 1:
        return per_class[:, 0]
    if logits.shape[1] == 2:
        return per_class[:, -1]
    return per_class.gather(1, logits.argmax(1)[segments.ids(per_class.device)][:, None])[:, 0]
