"""The model registry: `create(name, in_dim, n_outputs, **kw)`, like timm's `create_model`."""

from __future__ import annotations

from slidemil.models.base import MILModel
from slidemil.utils.registry import Entry, Registry

MODELS = Registry("model", skip=("in_dim", "n_outputs"), base=MILModel)


def register(name: str, paper: str, summary: str, complexity: str = "O(N)"):
    """Class decorator adding a MILModel subclass to the registry under `name` (one line per model file)."""
    return MODELS.register(name, paper=paper, summary=summary, complexity=complexity)


def available() -> list[str]:
    """Names of the registered aggregators, sorted."""
    return MODELS.available()


def info(name: str) -> Entry:
    """The registry entry of `name`: `.cls`, `.paper`, `.summary`, `.complexity`, `.arguments()`."""
    return MODELS.info(name)


def create(name: str, in_dim: int, n_outputs: int, **kwargs) -> MILModel:
    """Build a registered MIL aggregator.

    Args:
        name: a name from `available()` (e.g. "abmil", "transmil", "clam_sb").
        in_dim: the feature dimension D of the bags it will read.
        n_outputs: the number of logits (classes for classification).
        **kwargs: the model's own arguments (see `info(name).arguments()`); unknown ones are refused
            with the list of valid ones.

    Example:
        >>> import torch, slidemil.models as M
        >>> model = M.create("abmil", in_dim=32, n_outputs=2, gated=True)
        >>> out = model(torch.randn(1, 50, 32))
        >>> tuple(out.logits.shape), tuple(out.instance_scores.shape)
        ((1, 2), (1, 50))
    """
    return MODELS.create(name, in_dim=in_dim, n_outputs=n_outputs, **kwargs)
