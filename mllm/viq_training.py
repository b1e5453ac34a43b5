"""Training the ViQ tokenizer itself (ViQ paper, stages 1 and 2) on the MLLM trainer.

Stage 1 (continuous, text-aligned): the any-resolution ViT's merged tokens go through a
projector into the LLM at the image positions; next-token loss on the answers, plus
self-distillation: 1 - cos(class token of the any-resolution student, class token of a
fixed-resolution teacher), the teacher a frozen or EMA copy of the ViT.

Stage 2 (discretisation): the proximal quantiser's quantised features go through a new
projector into the LLM; next-token loss, self-distillation, and the VAE-latent loss: a head
predicts the latents of a frozen VAE (diffusers AutoencoderKL) from the quantised features.

The module below is one nn.Module whose forward(batch) returns the token-loss sum and count
(normalised globally by the trainer, like MLLM training) and a mean auxiliary loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mllm.config import TrainConfig
from mllm.trainer import Trainer
from viq import ViQModel
from viq.config import ConfigError


@dataclass
class PhaseConfig:
    """One step of the progressive-resolution schedule."""

    max_pixels: int = 224 * 224
    max_seq_len: int = 2048
    steps: int = 100


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
        if self.vision.source != "online":
            raise ConfigError("ViQ training encodes images in the loop: set vision.source=online")
        return self


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ViQTrainModel(nn.Module):
    """ViQ tokenizer + projector + LLM (+ teacher, + VAE-latent head) for stages 1 and 2."""

    def __init__(self, viq, mllm, cfg: ViQStageConfig, *, decoder=None):
        super().__init__()
        self.cfg = cfg
        self.stage = cfg.stage
        self.viq = viq
        self.mllm = mllm
        hidden = mllm.config.hidden_size
        in_dim = viq.config.width if cfg.stage == 1 else viq.config.feature_dim
        self.projector = projector(in_dim, cfg.projector_hidden or hidden, hidden)
        self.teacher = None
        if cfg.teacher != "none":
            self.teacher = copy.deepcopy(viq.vit)
            self.teacher.requires_grad_(False)
        self.decoder = decoder  # stage 2: ViQDecoder (trainable latent head + frozen VAE)
        self.apply_freezing()

    def apply_freezing(self) -> dict:
        """Set requires_grad from the stage config; returns what trains (logged by the trainer)."""
        c = self.cfg
        self.viq.vit.requires_grad_(c.train_vit)
        self.viq.quantizer.requires_grad_(self.stage == 2 and c.train_quantizer)
        self.mllm.llm.requires_grad_(c.train_llm)
        self.mllm.merger.requires_grad_(False)  # codes never enter during tokenizer training
        if self.decoder is not None:
            self.decoder.head.requires_grad_(True)
            self.decoder.vae.requires_grad_(False)
        report = {}
        for name, module in self.named_children():
            params = list(module.parameters())
            if params:
                report[name] = sum(p.numel() for p in params if p.requires_grad)
        return report

    def _teacher_cls(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        r = self.cfg.teacher_resolution
        fixed = [F.interpolate(p[None].float(), size=(r, r), mode="bilinear", align_corners=False)[0].to(p.dtype) for p in pixels]
        with torch.no_grad():
            _, cls, _ = self.teacher(fixed)
        return cls

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher towards the student ViT (teacher=ema)."""
        if self.cfg.teacher != "ema":
            return
        d = self.cfg.ema_decay
        for t, s in zip(self.teacher.parameters(), self.viq.vit.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1 - d)

    def forward(self, batch: dict) -> dict:
        pixels = batch["images"]
        logs: dict[str, float] = {}
        if self.stage == 1:
            features, cls, grids = self.viq.vit(pixels)
        else:
            out = self.viq(pixels)
            features, cls, grids = out["quantized"], out["class_tokens"], out["grids"]
            logs.update(out["stats"])
        llm = self.mllm.llm
        input_ids = batch["input_ids"]
        image_mask = input_ids == self.mllm.vocab.image_pad_id
        embeds = self.projector(features)
        n_pad = int(image_mask.sum())
        if n_pad != embeds.shape[0]:
            raise ValueError(f"batch has {n_pad} image positions but the images give {embeds.shape[0]} tokens")
        text = llm.get_input_embeddings()(input_ids)
        inputs = text.masked_scatter(image_mask.unsqueeze(-1), embeds.to(text.dtype))
        hidden = llm.model(inputs_embeds=inputs, position_ids=batch["position_ids"], attention_mask=None,
                           use_cache=False).last_hidden_state
        loss_sum, n_sup = self.mllm.loss_from_hidden(hidden, batch["labels"])
        aux = hidden.new_zeros((), dtype=torch.float32)
        if self.teacher is not None and self.cfg.distill_weight:
            distill = (1 - F.cosine_similarity(cls.float(), self._teacher_cls(pixels).float(), dim=-1)).mean()
            aux = aux + self.cfg.distill_weight * distill
            logs["distill_loss"] = float(distill.detach())
        if self.decoder is not None and self.cfg.vae_weight:
            from viq.decoder import latent_regression_loss, unnormalize_pixels, vae_latent_target

            targets = vae_latent_target(self.decoder.vae, [unnormalize_pixels(p) for p in pixels], grids)
            vae_loss = latent_regression_loss(self.decoder.head.latents(features, grids), targets)
            aux = aux + self.cfg.vae_weight * vae_loss
            logs["vae_latent_loss"] = float(vae_loss.detach())
        return {"loss_sum": loss_sum, "n_supervised": n_sup, "aux_loss": aux, "logs": logs}


# ---- the trainer ---------------------------------------------------------------------------

EXPORT_DIR = "export"


class ViQTrainer(Trainer):
    """The MLLM trainer with the ViQ training model, a resolution schedule and an EMA hook."""

    def __init__(self, cfg: ViQTrainConfig, *, resume: str | None = None):
        v = cfg.viq_train
        if v.stage == 2:
            init = Path(v.init_from)
            if not (init / "viq" / "config.json").is_file():
                raise FileNotFoundError(f"viq_train.init_from: {init} has no viq/ tokenizer (the export of a stage-1 run)")
            cfg.model.viq = str(init / "viq")
        self.phases = list(v.phases)
        self.phase = 0
        super().__init__(cfg, resume=resume)

    # ---- schedule ------------------------------------------------------------------------------
    def _phase_for(self, step: int) -> int:
        end = 0
        for i, phase in enumerate(self.phases):
            end += phase.steps
            if step < end:
                return i
        return max(0, len(self.phases) - 1)

    def data_settings(self) -> tuple:
        if not self.phases:
            return super().data_settings()
        phase = self.phases[self.phase]
        policy = replace(self.viq_config.resize_policy, max_pixels=phase.max_pixels)
        return policy, phase.max_seq_len

    def before_step(self) -> None:
        if self.phases and self._phase_for(self.step) != self.phase:
            self.phase = self._phase_for(self.step)
            self._make_data()
            p = self.phases[self.phase]
            self.info(f"step {self.step}: resolution phase {self.phase} (max_pixels {p.max_pixels}, "
                      f"{p.max_seq_len} tokens, {len(self.dataset)} samples)")

    def extra_loop_state(self) -> dict:
        return {"phase": self.phase}

    def restore_extra_loop_state(self, state: dict) -> None:
        if state.get("phase", 0) != self.phase:
            self.phase = state["phase"]
            self._make_data()

    def after_step(self, metrics: dict) -> None:
        self.model.update_teacher()
        usage = metrics["logs"].get("codebook_usage")
        if usage is not None and usage < self.cfg.viq_train.usage_warn_below and self.is_main:
            print(f"[train] warning: step {self.step}: codebook usage {usage:.4f} is below "
                  f"{self.cfg.viq_train.usage_warn_below} (codebook collapse?)", flush=True)

    # ---- model -----------------------------------------------------------------------------
    @property
    def llm(self):
        return self.model.mllm.llm

    def _build_model(self):
        v = self.cfg.viq_train
        torch.manual_seed(self.cfg.trainer.seed)
        viq = ViQModel.from_pretrained(self.cfg.model.viq, device=self.device)
        init_llm = Path(v.init_from) / "llm" if v.stage == 2 else None
        if init_llm is not None and init_llm.is_dir():
            from mllm.export import load_export

            mllm, _, _ = load_export(init_llm, device=self.device, dtype=self.dtype,
                                     attn_implementation=self.cfg.model.attn_implementation)
        else:
            mllm = super()._build_model()
        decoder = None
        if v.stage == 2:
            from viq.decoder import ViQDecoder, tiny_vae

            vae = tiny_vae(self.cfg.trainer.seed) if v.vae == "tiny" else v.vae
            decoder = ViQDecoder.from_vae(vae, viq.config.feature_dim, hidden_size=v.latent_head_hidden,
                                          seed=self.cfg.trainer.seed)
        if v.stage == 2 and v.center_bottleneck:
            self._center_bottleneck(viq)
        if v.stage == 2 and v.train_vit:
            # A fixed centre goes stale as the ViT moves and usage collapses to one code (measured).
            viq.config.center_momentum = v.center_momentum
        model = ViQTrainModel(viq, mllm, v, decoder=decoder).to(device=self.device, dtype=self.dtype)
        if v.stage == 2:
            # The stage-1 projector read continuous features; stage 2 feeds quantised ones to a new one.
            self.info(f"stage 2 from {v.init_from}: ViQ{' and LLM' if init_llm.is_dir() else ''} weights loaded")
        return model

    @torch.no_grad()
    def _center_bottleneck(self, viq, n_samples: int = 64) -> None:
        """Mean ViT token over this rank's first samples, averaged over ranks, folded into the
        bottleneck bias (before DeepSpeed copies the weights, identically on every rank)."""
        from mllm.engine import all_reduce_sum

        total, count = None, 0
        for i in range(self.rank, min(len(self.dataset), n_samples * self.world), self.world):
            images = self.dataset[i].get("images") or []
            if not images:
                continue
            tokens, _, _ = viq.vit([p.to(self.device) for p in images])
            total = tokens.float().sum(0) if total is None else total + tokens.float().sum(0)
            count += tokens.shape[0]
        if total is None:
            total = torch.zeros(viq.config.width, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        count = all_reduce_sum(count, self.device)
        if count:
            viq.quantizer.center_bottleneck(total / count)
            self.info(f"stage 2: bottleneck centred on the mean of {int(count)} ViT tokens")

    def _freeze(self) -> None:
        report = self.model.apply_freezing()
        self.info(f"trainable parameters by part: {report} (viq_train.train_vit / train_quantizer / train_llm)")

    def _to_device(self, batch: dict) -> dict:
        out = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        out["images"] = [p.to(device=self.device, dtype=self.dtype) for p in batch["images"]]
        return out

    # ---- export ----------------------------------------------------------------------------
    def export(self) -> Path:
        """runs/<name>/export/: viq/ (ViQModel.from_pretrained loads it; with decoder/ after
        stage 2), llm/ (the LLM used to align it) and projector.safetensors."""
        from safetensors.torch import save_file

        from mllm.engine import gathered
        from mllm.export import save_export

        out = self.run_dir / EXPORT_DIR
        stage = self.ds_config["zero_optimization"]["stage"]
        with gathered(stage)(list(self.model.parameters()), modifier_rank=None):
            if self.is_main:
                out.mkdir(parents=True, exist_ok=True)
                viq = self.model.viq
                viq.save_pretrained(out / "viq")
                if self.model.decoder is not None:
                    self.model.decoder.save_pretrained(out / "viq")
                save_export(self.model.mllm, self.tokenizer, self.vocab, out / "llm")
                state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.projector.state_dict().items()}
                save_file(state, str(out / "projector.safetensors"))
        self._barrier()
        self.info(f"exported {out} (tokenizer: {out / 'viq'})")
        return out
