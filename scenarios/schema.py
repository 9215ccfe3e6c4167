"""Build frozen config dataclasses from plain YAML data, naming the key path of every problem.

The dataclasses themselves live next to the code that uses them (nmoe_models.config,
agents.config, broker.channel.config); this module only knows how to fill them: field types come
from the annotations, value checks from each class's ``__post_init__`` (which raises
``ValueError("<field>: <msg>")``). Unknown keys are errors with a did-you-mean hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from nmoe.errors import ConfigError, check

from . import yamlload

T = TypeVar("T")


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Construct dataclass ``cls`` from ``data`` (a mapping), recursively and strictly."""
    where = path or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        near = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{_join(path, key)}: unknown key{hint}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(hints[name], data[name], _join(path, name)) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{_join(path, str(err)) if path else err}") from err


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)  # type: ignore[arg-type]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if value not in values:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, values))}")
        return tp(value)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        item = args[0]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        ktp, vtp = args
        return {_convert(ktp, k, path): _convert(vtp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        if math.isnan(value):  # no setting means "not a number"; .inf is left to each field's bounds
            raise ConfigError(f"{path}: expected a number, got .nan")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"schema: unsupported field type {tp!r} at {path}")  # a bug in a config class


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to raw scenario data."""
    out: dict[str, Any] = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set stage1.rounds=5")
        key, raw = item.split("=", 1)
        if not [p for p in key.strip().split(".") if p]:
            raise ConfigError(f"--set {item!r}: empty key path")
        set_path(out, key.strip(), yamlload.loads(raw, f"--set {key}"), f"--set {key}")
    return out


def set_path(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    """data[a][b][c] = value for path 'a.b.c', creating sections; refuses to descend into a value."""
    parts = [p for p in path.split(".") if p]
    check(bool(parts), where, "empty key path")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (tuples become lists), for results.json."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
