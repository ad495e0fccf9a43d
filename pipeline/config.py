"""Typed configuration: frozen dataclasses built from plain dicts, refusing anything unexpected.

Each params.yaml section maps onto one frozen dataclass (nested dataclasses for sub-sections). `from_dict`
checks every key and value against the dataclass's type hints and raises `ConfigError` naming the full
key (`distill.loss.margin`), the value and what is allowed. Supported field types: bool, int, float,
str, Path, Literal[...], X | None, tuple[X, ...], dict[str, X] and nested dataclasses.

Every number of every section is checked here, whatever its dataclass says, before its own `__post_init__`
ranges: a float must be finite (an infinite learning rate or a NaN weight decay passes `lr > 0` and
`weight_decay >= 0`, and ends as a NaN loss or a traceback hours later), and an int must lie in
0 .. INT_MAX (every int parameter is a count, a size, an index or a seed: none is negative, and none needs
more than 31 bits, while 1e20 rows overflow numpy and torch). A path must not hold a NUL byte (no file
system takes one). Field-specific ranges (lr > 0, crop <= resize, ...) stay in each dataclass's
`__post_init__`, which `from_dict` turns into a ConfigError naming the section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import ConfigError
from pipeline.store.durable import write_text_durably
from pipeline.store.ownership import Output, read_small
from pipeline.text_files import parse_yaml

T = TypeVar("T")

INT_MAX = 2**31 - 1  # the largest int parameter: counts, sizes and seeds all fit in 31 bits


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
        # a value of the kind one option takes (a string for `Path | dict[str, Path]`) failed that option's own
        # check (a NUL byte): its message says why; else the value is of none of the kinds
        kind = [err for option, err in zip(options, errors) if _of_kind(option, value)]
        if len(kind) == 1 or len(errors) == 1:
            raise ConfigError(kind[0] if len(kind) == 1 else errors[0])
        raise ConfigError(f"{key}: {value!r} matches none of {_describe(tp)}")
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
        if not 0 <= value <= INT_MAX:
            raise ConfigError(f"{key}: {value} is out of range; expected an integer from 0 to {INT_MAX:,}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        if "\0" in str(value):
            raise ConfigError(f"{key}: the path {str(value)!r} holds a NUL byte, which no file name can")
        return Path(value)
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")  # a bug in a dataclass, not user input


def _of_kind(tp: Any, value: Any) -> bool:
    """Whether `value` is of the Python kind that type `tp` is built from (before any range or content check)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, Mapping)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if tp is Path:
        return isinstance(value, (str, Path))
    if tp in (int, float):
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return tp in (str, bool) and isinstance(value, tp)


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
        value = parse_yaml(text, f"--set {item!r}") if text.strip() else ""
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
        doc = parse_yaml(read_small(p).decode("utf-8"), str(p))  # within limits (text_files.py)
        return isinstance(doc, dict) and list(doc) == [section] and isinstance(doc[section], dict)

    resolved = Output(f"a resolved {section} config", recognise=earlier)
    write_text_durably(path, yaml.safe_dump({section: to_dict(cfg)}, sort_keys=False), resolved)
