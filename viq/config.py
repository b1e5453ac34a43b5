"""Typed configs: dataclasses built from nested dicts that reject unknown keys.

Every part of the project (ViQ, LLM, data, optim, trainer) has one dataclass; this module
holds the one way to build any of them from YAML/JSON and to apply `a.b=v` overrides.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any


from viq.errors import ConfigError, DataError  # noqa: F401 - ConfigError re-exported: the name callers import from here
from viq.io import read_json


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls, data: dict | None, where: str = "", source: str | None = None):
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields.

    Unknown keys raise ConfigError naming the file (`source`), the full dotted key and the
    valid names.
    """
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            (f"{source}: " if source else "")
            + f"unknown config key '{key}'; valid keys{' under ' + where if where else ''}: "
            + ", ".join(sorted(types))
        )
    kwargs = {}
    for name, value in data.items():
        tp = types[name]
        sub = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{sub}' must be a mapping, got {type(value).__name__}")
            kwargs[name] = from_dict(tp, value, sub, source)
        else:
            kwargs[name] = _coerce(value, tp, sub)
    return cls(**kwargs)


def _coerce(value, tp, key):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key) if len(non_none) == 1 else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        if _is_dataclass_type(inner):
            out = []
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    raise ConfigError(f"config key '{key}[{i}]' must be a mapping, got {v!r}")
                out.append(from_dict(inner, v, f"{key}[{i}]"))
        else:
            out = [_coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def read_json_config(path: str, missing_hint: str) -> dict:
    """A saved component config (config.json) as a dict without its `model_type` marker; a
    missing file or invalid JSON is a one-line ConfigError naming the file."""
    import os

    if not os.path.isfile(path):
        raise ConfigError(missing_hint)
    try:
        raw = read_json(path, what="config file")
    except DataError as e:  # a damaged config is reported as a config problem, with file:line:column
        raise ConfigError(str(e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    raw.pop("model_type", None)
    return raw


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], parsed value); values parse as JSON/YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    import yaml

    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=v` overrides to a nested dict (validation happens in from_dict)."""
    data = json.loads(json.dumps(data))
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a mapping")
        node[path[-1]] = value
    return data


__all__ = ["ConfigError", "from_dict", "to_dict", "apply_overrides", "parse_override", "dataclass", "field"]
