"""One registry class for everything a user picks by name: models, re-embeddings, strategies, encoders,
certification tests (the split of timm's `_registry.py` / `_factory.py`: registration and lookup here,
construction through `create`).

Each entry is a name, the object it builds (a class or a factory) and free-form metadata (paper,
summary, ...). `create` checks keyword arguments against the builder's signature before building, so a
typo in `--model-arg` or `--strategy-arg` is an error that lists the valid arguments, never a raw
TypeError halfway through a run.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from slidemil.errors import InputError


class RegistryError(InputError, ValueError):
    """An unknown name or argument; the message lists what is valid (an input error the CLI prints)."""


def builder_arguments(builder: Callable, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments of a class's `__init__` (or a function) with their defaults. A subclass that
    passes **kwargs up inherits its parent's arguments."""
    args: dict[str, Any] = {}
    targets = [k.__init__ for k in builder.__mro__ if "__init__" in vars(k)] if inspect.isclass(builder) else [builder]
    for target in targets:
        params = inspect.signature(target).parameters
        for k, p in params.items():
            if k not in skip and k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                args.setdefault(k, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return args


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Entry:
    """A registered name: `obj` builds it; `meta` holds what listings show (paper, summary, ...)."""

    name: str
    obj: Any
    meta: dict = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def __getattr__(self, key: str):
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def cls(self):
        return self.obj

    def arguments(self) -> dict[str, Any]:
        """The builder's user-settable arguments (those not supplied by slidemil itself) with defaults."""
        return builder_arguments(self.obj, self.skip)


class Registry:
    """`register` (decorator or call), `available`, `info`, `check_args`, `create`.

    `kind` names the thing in messages ("model", "strategy"); `skip` lists builder arguments slidemil
    fills in itself (e.g. in_dim, n_outputs), which users cannot set; `resolvers` map a prefix such as
    "timm:" to a function building an entry on demand for open-ended families. `available()` is sorted
    by name unless `sort=False` keeps the order of registration.
    """

    def __init__(self, kind: str, skip: tuple[str, ...] = (), base: type | None = None, sort: bool = True):
        self.kind, self.skip, self.base, self.sort = kind, tuple(skip), base, sort
        self._entries: dict[str, Entry] = {}
        self._resolvers: dict[str, Callable[[str], Entry]] = {}

    def register(self, name: str, obj: Any = None, **meta):
        """`@registry.register("name", paper=...)` on a class or function, or `registry.register("name", obj)`."""

        def add(target):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.base is not None and not (inspect.isclass(target) and issubclass(target, self.base)):
                raise TypeError(f"{self.kind} {name!r}: {target!r} must subclass {self.base.__name__}")
            self._entries[name] = Entry(name, target, dict(meta), self.skip)
            return target

        return add if obj is None else add(obj)

    def add_resolver(self, prefix: str, resolve: Callable[[str], Any], **meta) -> None:
        """Names `prefix<rest>` are built on demand by `resolve(rest)` (e.g. `timm:<any timm model>`)."""
        self._resolvers[prefix] = lambda rest: Entry(prefix + rest, resolve(rest), dict(meta), self.skip)

    def available(self) -> list[str]:
        return sorted(self._entries) if self.sort else list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or any(str(name).startswith(p) for p in self._resolvers)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[k] for k in self.available())

    def info(self, name: str) -> Entry:
        """The entry of `name`, or a RegistryError listing the choices and the closest one."""
        if name in self._entries:
            return self._entries[name]
        for prefix, resolve in self._resolvers.items():
            if str(name).startswith(prefix):
                return resolve(name[len(prefix):])
        extra = "".join(f" or {p}<name>" for p in self._resolvers)
        raise RegistryError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; choose one of "
                            f"{', '.join(self.available())}{extra}")

    def check_args(self, name: str, kwargs: dict) -> None:
        """Refuse arguments the builder does not take, naming the valid ones."""
        allowed = self.info(name).arguments()
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            hint = "".join(did_you_mean(u, allowed) for u in unknown)
            listed = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
            raise RegistryError(f"{self.kind} {name!r} takes no argument(s) {', '.join(unknown)}{hint}; "
                                f"its arguments are: {listed}")

    def create(self, name: str, *args, **kwargs):
        """Build `name` with what slidemil supplies (positional, or the `skip` keywords) and the user's
        keyword arguments, which are checked first."""
        self.check_args(name, {k: v for k, v in kwargs.items() if k not in self.skip})
        return self.info(name).obj(*args, **kwargs)
