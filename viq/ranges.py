"""Ranges of numeric config values, declared once beside the fields they govern.

    @dataclass
    class TrainerConfig:
        log_every: int = 10
        ...
        RANGES: ClassVar[dict] = {"log_every": at_least(1), ...}

`range_errors(cfg)` walks a config and its nested sections and returns one line per value
outside its range (non-finite floats are always out of range). Every int / float field (and
list of them) must have a declared range: a new numeric field without one is reported too,
so that no value reaches the trainer unchecked. A section switched off (`enabled: false`, e.g.
`model.lora`) is not checked: its values are not used.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self) -> str:
        if self.high is None:
            if self.low is None:
                return "a finite number"
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")

    def invalid_example(self):
        """A value this range rejects (used by the test that walks every field)."""
        if self.low is not None:
            return self.low if self.low_open else self.low - 1
        if self.high is not None:
            return self.high if self.high_open else self.high + 1
        return float("nan")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def at_least(low: float) -> Range:
    return Range(low=low)


def positive() -> Range:
    return Range(low=0, low_open=True)


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Range:
    return Range(low=low, high=high, low_open=low_open, high_open=high_open)


ANY_FINITE = Range()


def _numeric_kind(tp) -> type | None:
    """int / float for a numeric field or a list of them; None otherwise."""
    if tp in (int, float):
        return tp
    if typing.get_origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        if args and args[0] in (int, float):
            return args[0]
    return None


def numeric_fields(cls) -> list[tuple[str, type, type]]:
    """(name, declared type, element kind) of the numeric fields of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _numeric_kind(hints[f.name])
        if kind is not None:
            out.append((f.name, hints[f.name], kind))
    return out


def range_errors(cfg, where: str = "") -> list[str]:
    """One line per numeric value of `cfg` (and its nested config sections) outside its declared range."""
    errors = []
    cls = type(cfg)
    if getattr(cfg, "enabled", True) is False:
        return errors
    ranges = getattr(cls, "RANGES", {})
    numeric = {name for name, _, _ in numeric_fields(cls)}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            errors += range_errors(value, key)
        elif isinstance(value, (list, tuple)) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):
                errors += range_errors(item, f"{key}[{i}]")
        elif f.name in numeric:
            if f.name not in ranges:
                errors.append(f"config key '{key}' has no declared range ({cls.__name__}.RANGES): declare one")
                continue
            rng = ranges[f.name]
            values = value if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in values if v is not None and not rng.contains(v)]
            if bad:
                errors.append(f"config key '{key}' must be {rng.describe()}, got {value}")
    return errors
