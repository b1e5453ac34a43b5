"""The ablation run's configuration (configs/ablation/*.yaml): what to train, how long, what to compare.

    stage1_export / stage1   one stage-1 tokenizer export shared by every variant (given, or trained here)
    stage2                   the stage-2 launch every variant repeats with its own switches
    mllm                     the MLLM launch on each variant's codes (and the blind baseline)
    eval                     the benchmarks every MLLM is scored on
    variants                 name + viq_train.quant switches + vae_weight; the first is the reference row

Unknown keys are rejected with the valid ones (viq.config.from_dict), as in every other config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from viq.config import ConfigError, apply_overrides, from_dict
from viq.quantizer import QuantConfig

BLIND = "blind"  # the row of the blind baseline (vision.source none)


@dataclass
class LaunchConfig:
    """One training launch: a preset, a step count and `--set` overrides on top of it."""

    config: str = ""  # YAML preset (configs/viq/*.yaml or configs/mllm/*.yaml)
    steps: int = 0  # 0: the preset's trainer.max_steps
    overrides: list[str] = field(default_factory=list)  # `key=value`, as train_*.py --set takes them


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["SYNTH_CHART", "SYNTH_DOC", "SYNTH_SHAPES"])
    data_root: str = ""  # folder of <KEY>.tsv; empty: <data.root>/vlmeval (the synthetic set's validation split)
    limit: int = 0  # first N records of each benchmark; 0: all
    max_new_tokens: int = 16
    batch_size: int = 8


@dataclass
class VariantConfig:
    name: str = ""
    quant: QuantConfig = field(default_factory=QuantConfig)  # viq_train.quant of its stage 2
    vae_weight: float = 1.0  # viq_train.vae_weight; 0 skips the VAE entirely
    label: str = ""  # the table's row label; empty: the name


@dataclass
class AblationConfig:
    name: str = "ablation"
    out: str = ""  # empty: runs/ablation/<name>
    data_root: str = "runs/data/synthetic"  # data.root of every launch (the synthetic set is generated if missing)
    synthetic_n: int = 600
    data_train: str = ""  # data.train of every launch: conversations JSONL or a mixture YAML (real data); empty: the synthetic set
    stage1_export: str = ""  # an existing stage-1 export (holding viq/); empty: train one with `stage1`
    stage1: LaunchConfig = field(default_factory=lambda: LaunchConfig("configs/viq/tiny-stage1.yaml"))
    stage2: LaunchConfig = field(default_factory=lambda: LaunchConfig("configs/viq/tiny-stage2.yaml"))
    mllm: LaunchConfig = field(default_factory=lambda: LaunchConfig("configs/mllm/tiny.yaml"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    variants: list[VariantConfig] = field(default_factory=lambda: [VariantConfig("default")])
    blind: bool = True  # add the blind baseline row (the MLLM with vision.source none)
    ranks: int = 1  # deepspeed --num_gpus
    master_port: int = 29650  # each launch's port: its own, so parallel ablations on one machine do not collide

    def validate(self, source: str = "") -> "AblationConfig":
        where = f"{source}: " if source else ""
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError(f"{where}'variants' is empty; list at least the reference variant")
        for i, name in enumerate(names):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
                raise ConfigError(f"{where}variants[{i}].name '{name}' must be non-empty letters, digits, '_', '.', '-'")
        dup = sorted({n for n in names if names.count(n) > 1} | ({BLIND} & set(names)))
        if dup:
            raise ConfigError(f"{where}variant names must be unique and not '{BLIND}' (the blind baseline's row); "
                              f"repeated or reserved: {', '.join(dup)}")
        for key, launch in (("stage1", self.stage1), ("stage2", self.stage2), ("mllm", self.mllm)):
            if key == "stage1" and self.stage1_export:
                continue
            if not Path(launch.config).is_file():
                raise ConfigError(f"{where}'{key}.config': {launch.config} does not exist")
            if launch.steps < 0:
                raise ConfigError(f"{where}'{key}.steps' must be >= 0 (0: the preset's max_steps), got {launch.steps}")
        if self.stage1_export and not (Path(self.stage1_export) / "viq" / "config.json").is_file():
            raise ConfigError(f"{where}'stage1_export': {self.stage1_export} has no viq/config.json (a stage-1 export)")
        if self.ranks < 1:
            raise ConfigError(f"{where}'ranks' must be >= 1, got {self.ranks}")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/ablation/{self.name}")

    @property
    def benchmark_root(self) -> Path:
        return Path(self.eval.data_root or Path(self.data_root) / "vlmeval")


def load_ablation_config(path: str, overrides: list[str] | None = None) -> AblationConfig:
    """configs/ablation/<name>.yaml plus `a.b=v` overrides, validated."""
    from viq.io import read_yaml

    if not Path(path).is_file():
        raise ConfigError(f"--config: {path} does not exist; presets: "
                          + ", ".join(sorted(p.name for p in Path("configs/ablation").glob("*.yaml"))))
    raw = read_yaml(path, what="ablation config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(AblationConfig, apply_overrides(raw, overrides or []), source=path).validate(path)
