"""Typed configuration: frozen dataclasses built from plain dicts, refusing anything unexpected.

Each params.yaml section maps onto one frozen dataclass (nested dataclasses for sub-sections). `from_dict`
checks every key and value against the dataclass's type hints and raises `ConfigError` naming the full
key (`distill.loss.margin`), the value and what is allowed. Supported field types: bool, int, float,
str, Path, Literal[...], X | None, tuple[X, ...], dict[str, X] and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import ConfigError
from pipeline.store.durable import write_text_durably
from pipeline.store.ownership import Output, read_small

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from `data`; `where` is the dotted name of the section, used in messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed keys are: {allowed}")
    hints = get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a default was not given
        raise ConfigError(f"{where}: {err}") from None
    except ValueError as err:  # __post_init__ checks of ranges and cross-field rules
        raise ConfigError(f"{where}: {err}") from None


def require_at_least(cfg: Any, minimum: int, *names: str) -> None:
    """For `__post_init__` range checks: each named field must be >= minimum (ValueError naming the field)."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_describe(tp)}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of the allowed values: {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_describe(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items ({_describe(tp)}), got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping ({_describe(tp)}), got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")  # a bug in a dataclass, not user input


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> Any:
    """A dataclass (or nested value) as plain YAML/JSON-serializable data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key.sub=value` overrides (value parsed as YAML) to a copy of the raw params."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value (a section name, then a key)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err.problem})") from None
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def write_resolved(cfg: Any, path: Path, section: str) -> None:
    """Write the resolved config of a stage next to its outputs (`{section: {...}}`), over nothing or over an
    earlier one (a YAML mapping of that one section)."""

    def earlier(p: Path) -> bool:
        doc = yaml.safe_load(read_small(p))
        return isinstance(doc, dict) and list(doc) == [section] and isinstance(doc[section], dict)

    resolved = Output(f"a resolved {section} config", recognise=earlier)
    write_text_durably(path, yaml.safe_dump({section: to_dict(cfg)}, sort_keys=False), resolved)
