"""Configuration of tokenizer training: the stage, the teacher, the VAE-latent loss, the schedule.

`ViQTrainConfig` is the MLLM `TrainConfig` plus a `viq_train` section; presets live in
`configs/viq/`. Everything is checked at start (`validate`), one line per wrong key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mllm.config import TrainConfig
from viq.config import ConfigError
from viq.quantizer import QuantConfig
from viq.ranges import at_least, between, positive


@dataclass
class PhaseConfig:
    """One step of the progressive-resolution schedule."""

    max_pixels: int = 224 * 224
    max_seq_len: int = 2048
    steps: int = 100

    RANGES: ClassVar[dict] = {"max_pixels": positive(), "max_seq_len": positive(), "steps": positive()}


@dataclass
class ViQStageConfig:
    stage: int = 1  # 1: continuous, text-aligned | 2: quantisation + VAE-latent reconstruction
    init_from: str = ""  # stage 2: a stage-1 run's export directory (holds viq/ and llm/)
    teacher: str = "frozen"  # frozen | ema | none: the fixed-resolution self-distillation teacher
    ema_decay: float = 0.999
    teacher_resolution: int = 224  # teacher sees every image resized to this square (multiple of 28)
    distill_weight: float = 1.0
    vae: str = "tiny"  # stage 2: local diffusers AutoencoderKL directory, or "tiny" (random, demos/tests)
    vae_weight: float = 1.0
    latent_head_hidden: int = 256
    projector_hidden: int = 0  # 0: the LLM's hidden size
    train_vit: bool = True
    train_quantizer: bool = True  # stage 2
    train_llm: bool = False
    usage_warn_below: float = 0.05  # warn when the fraction of codes used in a step falls below this
    center_bottleneck: bool = True  # stage 2: centre the quantiser's input on the data (ProximalQuantizer.center_bottleneck)
    center_momentum: float = 0.9  # stage 2 with train_vit: the centre follows the moving ViT tokens (EMA per step)
    phases: list[PhaseConfig] = field(default_factory=list)  # empty: one phase from data/trainer settings

    # ---- stage 1 from a pretrained vision tower (viq/towers.py) ------------------------------
    init_vit_from: str = ""  # a local SigLIP / SigLIP2 / InternViT directory: the ViT takes its architecture and weights
    init_vit_layers: int = 0  # keep the tower's first N blocks (0: all); LLaVA-OneVision keeps 26 of SigLIP-so400m's 27

    # ---- stage 2: the quantiser it trains (ablation switches, docs/ablation.md) ----------------
    # Replaces the stage-1 tokenizer's `quant` section; the defaults are the paper's quantiser, and a
    # quantiser whose switches differ from the stage-1 tokenizer's is built new (seeded by viq.seed).
    quant: QuantConfig = field(default_factory=QuantConfig)

    RANGES: ClassVar[dict] = {
        "stage": between(1, 2), "ema_decay": between(0, 1), "teacher_resolution": at_least(28),
        "distill_weight": at_least(0), "vae_weight": at_least(0), "latent_head_hidden": at_least(1),
        "projector_hidden": at_least(0), "usage_warn_below": between(0, 1), "center_momentum": between(0, 1, high_open=True),
        "init_vit_layers": at_least(0),
    }


@dataclass
class ViQTrainConfig(TrainConfig):
    viq_train: ViQStageConfig = field(default_factory=ViQStageConfig)

    def validate(self) -> "ViQTrainConfig":
        super().validate()
        v = self.viq_train
        if v.stage not in (1, 2):
            raise ConfigError(f"config key 'viq_train.stage' is {v.stage}; valid values: 1, 2")
        if v.teacher not in ("frozen", "ema", "none"):
            raise ConfigError(f"config key 'viq_train.teacher' is '{v.teacher}'; valid values: frozen, ema, none")
        if v.teacher_resolution % 28:
            raise ConfigError(f"config key 'viq_train.teacher_resolution' must be a multiple of 28, got {v.teacher_resolution}")
        if v.teacher == "ema" and self.trainer.zero_stage == 3:
            raise ConfigError("viq_train.teacher=ema needs full parameters on every rank: use trainer.zero_stage <= 2")
        if v.stage == 2 and not v.init_from:
            raise ConfigError("viq_train.stage=2 needs viq_train.init_from: the export directory of a stage-1 run")
        if self.model.lora.enabled and not v.train_llm:
            raise ConfigError("config key 'model.lora.enabled' adapts the LLM, which tokenizer training freezes: "
                              "set viq_train.train_llm=true (LoRA then trains the LLM's adapters) or disable model.lora")
        if self.model.lora.export_adapter:
            raise ConfigError("config key 'model.lora.export_adapter' applies to MLLM training; tokenizer training "
                              "exports the LLM merged (export/llm/)")
        if v.init_vit_from and v.stage != 1:
            raise ConfigError("viq_train.init_vit_from starts stage 1 from a vision tower; stage 2 starts from "
                              "viq_train.init_from (a stage-1 export)")
        if v.init_vit_layers < 0:
            raise ConfigError(f"config key 'viq_train.init_vit_layers' must be >= 0 (0: all the tower's layers), got {v.init_vit_layers}")
        if self.vision.source != "online":
            raise ConfigError("ViQ training encodes images in the loop: set vision.source=online")
        return self


