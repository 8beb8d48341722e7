"""Holding a module outside its owner's module tree."""

from __future__ import annotations

from torch import nn


class Detached:
    """A module kept out of its owner's `state_dict`, `parameters()` and `.to()`: EMA teachers and frozen
    generators serve training only, are never optimised and never saved with the model. Call it like
    the module; `module` is None until one is set."""

    def __init__(self, module: nn.Module | None = None):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)
