"""The strategy interface: a MILModel around another, with the same forward (so prediction, heatmaps
and checkpoints work unchanged) plus the strategy's training behaviour (extra loss terms, masking,
teachers, augmentation) through the loss and the trainer's hooks."""

from __future__ import annotations

from slidemil.models.base import MILModel, MILOutput
from slidemil.utils.registry import Registry

STRATEGIES = Registry("strategy", skip=("model",))


def register_strategy(name: str, paper: str, summary: str):
    """Class decorator adding a Strategy subclass under `name` (`--strategy NAME`)."""

    def wrap(cls):
        STRATEGIES.register(name, cls, paper=paper, summary=summary)
        cls.name = name
        return cls

    return wrap


class Strategy(MILModel):
    requires_attention = True  # the strategy reads an attention distribution over the bag

    def __init__(self, model: MILModel):
        if self.requires_attention and not model.attention_scores:
            raise ValueError(f"strategy {type(self).name!r} needs an attention model; {type(model).__name__} "
                             f"does not pool by attention (see `slidemil models`)")
        super().__init__(model.in_dim, model.n_outputs)
        self.model = model
        self.attention_scores = model.attention_scores

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        return self.model(x, mask, coords)

    def loss(self, out, target, task_loss):
        return self.model.loss(out, target, task_loss)

    def fit_start(self, context) -> None:
        self.model.fit_start(context)

    def epoch_start(self, epoch: int, n_epochs: int) -> None:
        self.model.epoch_start(epoch, n_epochs)

    def batch_start(self, ids: list[str]) -> None:
        self.model.batch_start(ids)

    def step_end(self) -> None:
        self.model.step_end()


def needs(value, what: str, strategy: str, model: MILModel):
    """An output the strategy reads (`out.bag_embedding`, ...), or an error naming the model that lacks it."""
    if value is None:
        raise ValueError(f"strategy {strategy!r} needs the model's {what}; {type(model).__name__} does not "
                         f"provide it (see `slidemil models`)")
    return value


def apply_strategy(model: MILModel, name: str | None, **kwargs) -> MILModel:
    """`model` wrapped by the registered strategy `name` (arguments checked), or `model` when no name."""
    if not name:
        return model
    return STRATEGIES.create(name, model, **kwargs)
