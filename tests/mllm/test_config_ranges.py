"""Every numeric config value is checked against a range declared beside its field."""
import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mllm.config import TrainConfig, load_config
from mllm.viq_training.config import ViQTrainConfig
from viq.config import ConfigError
from viq.model import ViQConfig
from viq.ranges import numeric_fields

REPO = Path(__file__).resolve().parents[2]


def _sections(cls, prefix=""):
    """(dotted prefix, dataclass) for cls and every config section nested in it."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}{f.name}.")
        elif inner is not None and dataclasses.is_dataclass(inner):
            yield from _sections(inner, f"{prefix}{f.name}[0].")


def _cases():
    seen = set()
    for root in (ViQTrainConfig, TrainConfig):
        for prefix, cls in _sections(root):
            for name, tp, kind in numeric_fields(cls):
                if (cls, name) not in seen:
                    seen.add((cls, name))
                    yield pytest.param(root, prefix, cls, name, tp, kind, id=f"{prefix}{name}")
    for name, tp, kind in numeric_fields(ViQConfig):
        yield pytest.param(ViQConfig, "viq.", ViQConfig, name, tp, kind, id=f"viq.{name}")


def _invalid_values(cls, name, kind):
    rng = cls.RANGES[name]
    values = [rng.invalid_example()]
    if kind is float:
        values += [math.nan, math.inf]
    return [kind(v) if kind is int else v for v in values]


def test_every_config_section_declares_exactly_its_numeric_fields():
    for root in (ViQTrainConfig, ViQConfig):
        for prefix, cls in _sections(root):
            numeric = {name for name, _, _ in numeric_fields(cls)}
            declared = set(getattr(cls, "RANGES", {}))
            assert declared == numeric, (cls.__name__, numeric ^ declared)


@pytest.mark.parametrize("root, prefix, cls, name, tp, kind", list(_cases()))
def test_an_out_of_range_value_is_a_one_line_error_naming_the_key(root, prefix, cls, name, tp, kind):
    is_list = typing.get_origin(tp) is list
    for bad in _invalid_values(cls, name, kind):
        value = [bad] if is_list else bad
        with pytest.raises(ConfigError) as info:
            if root is ViQConfig:
                ViQConfig.from_dict({name: value})
            elif "[0]." in prefix:  # a list of sections (viq_train.phases)
                head = prefix.split("[0].")[0]
                load_config(None, [f"{head}=[{{{name}: {value}}}]"], cls=root)
            else:
                enable = [f"{prefix}enabled=true"] if "enabled" in {f.name for f in dataclasses.fields(cls)} else []
                load_config(None, [*enable, f"{prefix}{name}={value}"], cls=root)
        assert f"config key '{prefix}{name}' must be " in str(info.value), str(info.value)
        assert len(str(info.value).splitlines()) == 1


def test_all_wrong_values_are_reported_together_through_the_entry_point():
    proc = subprocess.run(
        [sys.executable, "scripts/train_mllm.py", "--set", "trainer.keep_checkpoints=0", "--set", "trainer.log_every=0",
         "--set", "trainer.save_every=-1", "--set", "optim.warmup_steps=-5", "--set", "optim.lr=inf"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "train_mllm: error: config key 'optim.lr' must be positive, got inf",
        "config key 'optim.warmup_steps' must be >= 0, got -5",
        "config key 'trainer.log_every' must be >= 1, got 0",
        "config key 'trainer.save_every' must be >= 0, got -1",
        "config key 'trainer.keep_checkpoints' must be >= 1, got 0",
    ], lines
