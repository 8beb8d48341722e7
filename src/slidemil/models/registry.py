"""Model registry: `create(name, in_dim, n_outputs, **kw)`, like timm's `create_model`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from slidemil.models.base import MILModel


@dataclass(frozen=True)
class ModelInfo:
    name: str
    cls: type
    paper: str
    summary: str
    complexity: str

    def arguments(self) -> dict:
        """Constructor arguments beyond in_dim/n_outputs, with their defaults."""
        return constructor_arguments(self.cls, ("self", "in_dim", "n_outputs"))


def constructor_arguments(cls: type, skip: tuple[str, ...]) -> dict:
    """Keyword arguments of `cls.__init__` with defaults (a subclass passing **kwargs up inherits its
    parent's arguments)."""
    args: dict = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        for k, p in params.items():
            if k not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                args.setdefault(k, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return args


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, paper: str, summary: str, complexity: str = "O(N)"):
    """Class decorator adding a MILModel subclass to the registry under `name`."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        if not issubclass(cls, MILModel):
            raise TypeError(f"{cls.__name__} must subclass MILModel")
        _REGISTRY[name] = ModelInfo(name, cls, paper, summary, complexity)
        return cls

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(available())}") from None


def create(name: str, in_dim: int, n_outputs: int, **kwargs) -> MILModel:
    entry = info(name)
    allowed = entry.arguments()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
                         f"its arguments are: {', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}")
    return entry.cls(in_dim=in_dim, n_outputs=n_outputs, **kwargs)
