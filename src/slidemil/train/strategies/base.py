"""The strategy interface: a MILModel around another, with the same forward (so prediction, heatmaps
and checkpoints work unchanged) plus the strategy's training behaviour (extra loss terms, masking,
teachers, augmentation) through the loss and the trainer's hooks."""

from __future__ import annotations

from slidemil.models.base import MILModel, MILOutput

STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(name: str, paper: str, summary: str):
    def wrap(cls):
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = cls
        cls.name, cls.paper, cls.summary = name, paper, summary
        return cls

    return wrap


class Strategy(MILModel):
    requires_attention = True  # the strategy reads an attention distribution over the bag

    def __init__(self, model: MILModel):
        if self.requires_attention and not getattr(model, "attention_scores", False):
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

    def step_end(self) -> None:
        self.model.step_end()


def needs(out: MILOutput, key: str, strategy: str):
    """An output the strategy reads, or an error naming the models that provide it."""
    value = out.extras.get(key)
    if value is None:
        raise ValueError(f"strategy {strategy!r} needs the model's bag {key} (extras[{key!r}]); abmil, transmil, "
                         f"acmil, rrt, mambamil and lbmamba provide it")
    return value


def apply_strategy(model: MILModel, name: str | None, **kwargs) -> MILModel:
    if not name:
        return model
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](model, **kwargs)
