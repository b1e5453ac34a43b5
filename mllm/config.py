"""Training configuration: one dataclass per part, YAML presets, `--set a.b=v` overrides.

    cfg = load_config("configs/mllm/tiny.yaml", ["optim.lr=3e-4", "trainer.max_steps=50"])

Unknown keys are rejected with the list of valid ones; the resolved config is written to
the run directory as config.yaml. With no file the dataclass defaults are the embedded
default: the tiny LLM and viq-tiny on the synthetic data set, CPU when there is no GPU.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from data.dataset import VISION_SOURCES
from data.packing import OVERLONG_POLICIES
from data.video import VideoSettings
from mllm.attention import ATTENTION_BACKENDS
from mllm.lora import LoraSettings
from mllm.kernels import KERNEL_SETS
from mllm.loss import LOSS_IMPLEMENTATIONS
from mllm.optimizers import OPTIMIZER_IMPLEMENTATIONS
from mllm.vocab_tables import EMBEDDING_INITS
from viq.config import ConfigError, apply_overrides, from_dict
from viq.io import atomic_write
from viq.ranges import at_least, between, positive, range_errors

DTYPES = ("auto", "fp32", "bf16")
NONFINITE_POLICIES = ("stop", "skip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelConfig:
    llm: str = "tiny"  # LLM preset (tiny, qwen2.5-0.5b/1.5b/7b) or a local HF checkpoint directory
    viq: str = "viq-tiny"  # ViQ preset or a saved tokenizer directory
    attn_implementation: str = "auto"  # auto | sdpa | flex_attention | flash_attention_2 | eager
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    vocab_init: str = "mean"  # mean | codebook: how the new code rows start
    vocab_init_noise: float = 0.05
    gradient_checkpointing: bool = False  # activation checkpointing of decoder layers
    checkpoint_fraction: float = 1.0  # with gradient_checkpointing: share of the layers that recompute (evenly spread)
    loss_impl: str = "chunked"  # chunked (recompute logits in backward) | fused (gradients in the forward)
    loss_chunk_size: int = 1024  # rows of logits alive at a time
    compile_layers: bool = False  # torch.compile each decoder layer (GPU: fuses norm / RoPE / SwiGLU)
    kernels: str = "none"  # none | liger: liger-kernel's RMSNorm and SwiGLU modules (CUDA; mllm/kernels.py)
    fp8: bool = False  # torchao float8 training of the decoder layers' linears (H100/H200)
    compile_mode: str = "default"  # with compile_layers: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    lora: LoraSettings = field(default_factory=LoraSettings)  # LoRA on the body, code rows in full (mllm/lora.py)

    RANGES: ClassVar[dict] = {"vocab_init_noise": at_least(0), "checkpoint_fraction": between(0, 1),
                              "loss_chunk_size": at_least(1)}


@dataclass
class VisionConfig:
    source: str = "codes"  # codes: read cached shards | online: run the ViQ encoder in the loop | none: blind baseline (one fixed code)
    codes_dir: str = ""  # default: <data.root>/codes-<viq name>
    extract_if_missing: bool = True  # extract codes before training when the cache is absent


@dataclass
class DataConfig:
    root: str = "runs/data/synthetic"  # where the synthetic demo data lives (generated if missing)
    train: str = ""  # conversations file (JSON/JSONL/parquet/HF dir) or mixture YAML; default <root>/train.jsonl
    image_root: str = ""  # default: the directory of the train file
    synthetic_n: int = 600  # size of the generated demo data set
    synthetic_videos: int = 0  # moving-shape videos added to a newly generated demo set (0: images only)
    max_seq_len: int = 4096
    overlong: str = "truncate"  # truncate | drop: samples longer than max_seq_len, counted
    buffer_size: int = 256  # samples packed together (best-fit-decreasing)
    micro_batch_packs: int = 1  # packed rows per micro-batch
    pad_to_capacity: bool = False  # pad each row to max_seq_len (static shapes on GPU)
    system_prompt: str = ""  # empty: Qwen2.5's default system prompt
    video: VideoSettings = field(default_factory=VideoSettings)  # frame sampling of video records (data/video.py)

    RANGES: ClassVar[dict] = {"synthetic_n": at_least(1), "synthetic_videos": at_least(0), "max_seq_len": at_least(1),
                              "buffer_size": at_least(1), "micro_batch_packs": at_least(1)}


@dataclass
class OptimConfig:
    lr: float = 2e-3
    code_embedding_lr: float = 0.0  # > 0: separate LR for the new code/row-end rows and the merger
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    schedule_steps: int = 0  # length of the warmup + cosine schedule; 0: trainer.max_steps
    grad_clip: float = 1.0  # 0: no clipping
    implementation: str = "config"  # config (the DeepSpeed JSON's optimizer) | torch_foreach | torch_fused | deepspeed_fused (mllm/optimizers.py)

    RANGES: ClassVar[dict] = {"lr": positive(), "code_embedding_lr": at_least(0), "weight_decay": at_least(0),
                              "betas": between(0, 1, high_open=True), "eps": positive(), "warmup_steps": at_least(0),
                              "min_lr_ratio": between(0, 1), "schedule_steps": at_least(0), "grad_clip": at_least(0)}


@dataclass
class FreezeConfig:
    text_embeddings: bool = False  # freeze the original (text) rows' embedding/head
    llm_body: bool = False  # freeze the decoder layers and final norm


@dataclass
class TrainerConfig:
    run_name: str = "tiny-synthetic"
    runs_dir: str = "runs"
    max_steps: int = 300
    grad_accum: int = 1
    zero_stage: int = 2
    deepspeed_config: str = ""  # JSON file; default configs/deepspeed/zero<stage>.json
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    export: bool = True  # write runs/<name>/hf/ at the end

    RANGES: ClassVar[dict] = {"max_steps": at_least(1), "grad_accum": at_least(1), "zero_stage": between(0, 3),  # ZeRO stage 0-3
                              "log_every": at_least(1), "save_every": at_least(0), "keep_checkpoints": at_least(1),
                              "seed": between(0, 2**32 - 1)}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> "TrainConfig":
        choices = {
            "vision.source": (self.vision.source, VISION_SOURCES),
            "data.overlong": (self.data.overlong, OVERLONG_POLICIES),
            "model.dtype": (self.model.dtype, DTYPES),
            "model.vocab_init": (self.model.vocab_init, EMBEDDING_INITS),
            "trainer.nonfinite": (self.trainer.nonfinite, NONFINITE_POLICIES),
            "model.loss_impl": (self.model.loss_impl, LOSS_IMPLEMENTATIONS),
            "model.attn_implementation": (self.model.attn_implementation, ("auto", *ATTENTION_BACKENDS)),
            "model.compile_mode": (self.model.compile_mode, COMPILE_MODES),
            "model.kernels": (self.model.kernels, KERNEL_SETS),
            "optim.implementation": (self.optim.implementation, OPTIMIZER_IMPLEMENTATIONS),
        }
        # Every wrong value at once, one line each: choices, then numbers against their declared ranges.
        errors = [f"config key '{key}' is '{value}'; valid values: {', '.join(valid)}"
                  for key, (value, valid) in choices.items() if value not in valid]
        errors += range_errors(self)
        if errors:
            raise ConfigError("\n".join(errors))
        self.model.lora.validate(self)
        self.data.video.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.runs_dir) / self.trainer.run_name


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, cls=TrainConfig):
    data: dict = {}
    source = None
    if path:
        source = str(path)
        if not os.path.isfile(source):
            raise ConfigError(f"config file not found: {source}")
        with open(source) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{source}:{mark.line + 1}" if mark else source
                raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a config file must be a mapping of sections (model, data, ...)")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, source=source or "--set").validate()


def cli_overrides(args, extra: list[str] | None = None) -> list[str]:
    """`--set` values plus the shortcut flags (--run-dir, --max-steps, --save-every) of the
    training entry points, as `a.b=v` overrides."""
    overrides = list(args.overrides) + list(extra or [])
    if args.run_dir:
        run_dir = Path(args.run_dir)
        overrides += [f"trainer.runs_dir={run_dir.parent}", f"trainer.run_name={run_dir.name}"]
    if args.max_steps is not None:
        overrides.append(f"trainer.max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"trainer.save_every={args.save_every}")
    return overrides


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
