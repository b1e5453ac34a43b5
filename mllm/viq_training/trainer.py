"""The tokenizer-training trainer: the MLLM `Trainer` with the ViQ training model, a progressive
resolution schedule, an EMA teacher and the stage export. It changes the trainer only through
its named extension points (see mllm/trainer.py).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from mllm.lora import apply_lora
from mllm.trainer import Trainer
from mllm.viq_training.config import ViQTrainConfig
from mllm.viq_training.export import export_stage
from mllm.viq_training.model import ViQTrainModel
from viq import ViQModel
from viq.errors import MissingFileError

log = logging.getLogger(__name__)


class ViQTrainer(Trainer):
    """The MLLM trainer with the ViQ training model, a resolution schedule and an EMA hook."""

    def __init__(self, cfg: ViQTrainConfig, *, resume: str | None = None):
        v = cfg.viq_train
        if v.stage == 2:
            init = Path(v.init_from)
            if not (init / "viq" / "config.json").is_file():
                raise MissingFileError(f"viq_train.init_from: {init} has no viq/ tokenizer (the export of a stage-1 run)")
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
            self.build_data()
            p = self.phases[self.phase]
            log.info(f"step {self.step}: resolution phase {self.phase} (max_pixels {p.max_pixels}, "
                      f"{p.max_seq_len} tokens, {len(self.dataset)} samples)")

    def extra_loop_state(self) -> dict:
        return {"phase": self.phase}

    def restore_extra_loop_state(self, state: dict) -> None:
        if state.get("phase", 0) != self.phase:
            self.phase = state["phase"]
            self.build_data()

    def after_step(self, metrics: dict) -> None:
        self.model.update_teacher()
        usage = metrics["logs"].get("codebook_usage")
        if usage is not None and usage < self.cfg.viq_train.usage_warn_below:
            log.warning(f"warning: step {self.step}: codebook usage {usage:.4f} is below "
                        f"{self.cfg.viq_train.usage_warn_below} (codebook collapse?)")

    # ---- model -----------------------------------------------------------------------------
    def build_viq_config(self):
        """With viq_train.init_vit_from, model.viq's configuration with the tower's ViT architecture."""
        base = super().build_viq_config()
        v = self.cfg.viq_train
        if v.stage == 2:  # the quantiser stage 2 trains: its switches set the code layout too (SimVQ's size)
            base.quant = replace(v.quant)
        if not v.init_vit_from:
            return base
        from viq.towers import read_tower

        self.tower = read_tower(v.init_vit_from)
        config, changed = self.tower.vit_config(base, layers=v.init_vit_layers)
        log.info(f"init_vit_from {v.init_vit_from}: a {self.tower.config_class}; the ViT takes its architecture"
                 + (": " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()) if changed
                    else f" (model.viq={self.cfg.model.viq} already has it)"))
        return config

    def _tower_initialised_viq(self) -> ViQModel:
        """A new tokenizer from the config, its ViT's weights from the tower (logged: loaded, new, dropped)."""
        v = self.cfg.viq_train
        viq = ViQModel.from_config(self.viq_config)
        for line in self.tower.load_into(viq.vit).lines(v.init_vit_from):
            log.info(line)
        log.info("  new outside the ViT: the quantiser (stage 2 trains it), the projector to the LLM"
                 + (f"; model.viq={self.cfg.model.viq} gave the configuration only" if Path(self.cfg.model.viq).is_dir() else ""))
        return viq.to(self.device)

    def build_model(self):
        v = self.cfg.viq_train
        torch.manual_seed(self.cfg.trainer.seed)
        if v.init_vit_from:
            viq = self._tower_initialised_viq()
        else:
            viq = ViQModel.from_pretrained(self.cfg.model.viq, device=self.device)
            if v.stage == 2 and viq.config.quant != v.quant:
                self._switch_quantizer(viq)
        init_llm = Path(v.init_from) / "llm" if v.stage == 2 else None
        if init_llm is not None and init_llm.is_dir():
            from mllm.export import load_export

            mllm, _, _ = load_export(init_llm, device=self.device, dtype=self.dtype,
                                     attn_implementation=self.cfg.model.attn_implementation)
            if self.cfg.model.lora.enabled:  # stage 1's adapters are merged in its export: new ones on top
                apply_lora(mllm, self.cfg.model.lora)
        else:
            mllm = super().build_model()
        decoder = None
        if v.stage == 2 and v.vae_weight > 0:  # vae_weight 0: neither the VAE nor the latent head exists
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
            log.info(f"stage 2 from {v.init_from}: ViQ{' and LLM' if init_llm.is_dir() else ''} weights loaded")
        return model

    def _switch_quantizer(self, viq) -> None:
        """A new quantiser with viq_train.quant's switches (the stage-1 one is untrained anyway)."""
        from viq.quantizer import ProximalQuantizer

        old = viq.config.quant
        viq.config.quant = replace(self.cfg.viq_train.quant)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(viq.config.seed)
            viq.quantizer = ProximalQuantizer(viq.config).to(self.device)
        changed = {k: (getattr(old, k), getattr(viq.config.quant, k)) for k in vars(old)
                   if getattr(old, k) != getattr(viq.config.quant, k)}
        log.info("stage 2: quantiser built with viq_train.quant: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))

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
            log.info(f"stage 2: bottleneck centred on the mean of {int(count)} ViT tokens")

    def configure_trainable(self, model) -> dict:
        """What trains is set by viq_train.train_vit / train_quantizer / train_llm: counts per part."""
        return model.apply_freezing()

    def prepare_batch(self, batch: dict) -> dict:
        out = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        out["images"] = [p.to(device=self.device, dtype=self.dtype) for p in batch["images"]]
        return out

    def export(self) -> Path:
        """runs/<name>/export/ (see mllm.viq_training.export)."""
        out = export_stage(self)
        log.info(f"exported {out} (tokenizer: {out / 'viq'})")
        return out
