"""Typed settings from a YAML file and command-line flags (flags win), and the help text a flag takes
from its settings field, so that every default and its description live in one place: the field."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from slidemil.errors import InputError


def read_yaml_mapping(path: str | os.PathLike, empty_ok: bool = True) -> dict:
    """A YAML file whose top level is a mapping, read with the safe loader (tags such as `!!python/object`
    are refused, never constructed); any problem is one InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}: not valid YAML{line} ({what})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise InputError(f"{path}: the top level must be a mapping of option: value, not {kind}")
    return data


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line: `field: problem; field: problem`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())


def load_config(cls: type[BaseModel], path: str | os.PathLike | None, overrides: dict) -> BaseModel:
    """Build `cls` from an optional YAML file, then the non-None `overrides` (CLI flags) on top."""
    data: dict = {}
    if path:
        data = read_yaml_mapping(path)
        data.pop("slidemil", None)  # provenance block written into a run's config.yaml
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except ValidationError as exc:
        raise InputError(f"invalid configuration{f' in {path}' if path else ''}: {describe(exc)}") from None


def field_help(cls: type[BaseModel], name: str) -> str:
    """A field's description followed by its default, for a CLI flag's help, and the defaults some choices
    override it with when the config class names them (`cls.default_overrides(name)`: {"dsmil": 0.6})."""
    f = cls.model_fields[name]
    text = f.description or name.replace("_", " ")
    overrides = getattr(cls, "default_overrides", lambda _: {})(name)
    others = "".join(f"; {who}: {value}" for who, value in overrides.items())
    default = f.get_default(call_default_factory=True)
    if f.is_required() or (default is None or default == {}) and not others:
        return text
    if default is None:
        default = "none"
    elif isinstance(default, bool):
        if not default and not others:
            return text
        default = "on" if default else "off"
    elif isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    return f"{text} (default: {default}{others})"
