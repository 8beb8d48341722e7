"""The strategy interface: a MILModel around another, with the same forward (so prediction, heatmaps
and checkpoints work unchanged) plus the strategy's training behaviour (extra loss terms, masking,
teachers, augmentation) through the loss and the trainer's hooks."""

from __future__ import annotations

from slidemil.models.base import MILModel, Wrapped
from slidemil.utils.registry import Registry

STRATEGIES = Registry("strategy", skip=("model",))


def register_strategy(name: str, paper: str, summary: str):
    """Class decorator adding a Strategy subclass under `name` (`--strategy NAME`)."""

    def wrap(cls):
        STRATEGIES.register(name, cls, paper=paper, summary=summary)
        cls.name = name
        return cls

    return wrap


class Strategy(Wrapped):
    requires_attention = True  # the strategy reads an attention distribution over the bag
    supports_packing = False   # its loss and hooks read packed outputs (`--pack-len`) correctly

    def __init__(self, model: MILModel):
        if self.requires_attention and not model.attention_scores:
            raise ValueError(f"strategy {type(self).name!r} needs an attention model; {type(model).__name__} "
                             f"does not pool by attention (see `slidemil models`)")
        super().__init__(model)
        self.packable = model.packable and self.supports_packing


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
