"""Training strategies that wrap a model (`--strategy NAME` on `slidemil train`)."""

from slidemil.train.strategies import aem, augment, mhim, packmil, sc  # noqa: F401  (registration)
from slidemil.train.strategies.base import STRATEGIES, Strategy, apply_strategy, register_strategy

__all__ = ["STRATEGIES", "Strategy", "apply_strategy", "register_strategy"]
