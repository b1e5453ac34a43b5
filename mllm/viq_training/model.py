"""The tokenizer-training model: ViQ tokenizer + projector + the project's MLLM (+ teacher, + VAE-latent head).

Stage 1 (continuous, text-aligned): the any-resolution ViT's merged tokens go through a
projector into the LLM at the image positions; next-token loss on the answers, plus
self-distillation: 1 - cos(class token of the any-resolution student, class token of a
fixed-resolution teacher), the teacher a frozen or EMA copy of the ViT.

Stage 2 (discretisation): the proximal quantiser's quantised features go through a new
projector into the LLM; next-token loss, self-distillation, and the VAE-latent loss: a head
predicts the latents of a frozen VAE (diffusers AutoencoderKL) from the quantised features.

The LLM part is `ViQMLLM`'s own forward with continuous `image_embeds` at the image positions
(no copy of it here). `forward(batch)` returns the token-loss sum and count (normalised
globally by the trainer, like MLLM training) and a mean auxiliary loss; the class satisfies
`mllm.contract.TrainableModel`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mllm.lora import check_lora_trainable, has_lora, set_llm_trainable
from mllm.viq_training.config import ViQStageConfig


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ViQTrainModel(nn.Module):
    """ViQ tokenizer + projector + ViQMLLM (+ teacher, + VAE-latent head) for stages 1 and 2."""

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

    # ---- mllm.contract.TrainableModel -------------------------------------------------------
    llm = property(lambda self: self.mllm.llm)
    vocab = property(lambda self: self.mllm.vocab)
    code_rows_split = property(lambda self: self.mllm.code_rows_split)
    decoder_layer_class = property(lambda self: self.mllm.decoder_layer_class)

    def gradient_checkpointing_enable(self, fraction: float = 1.0) -> int:
        """Checkpoint the ViT's blocks (all of them) and `fraction` of the LLM's layers; returns the count."""
        self.viq.vit.gradient_checkpointing = True
        return len(self.viq.vit.blocks) + self.mllm.gradient_checkpointing_enable(fraction=fraction)

    def compile_decoder_layers(self, **compile_kwargs) -> int:
        return self.mllm.compile_decoder_layers(**compile_kwargs)

    def unsupported_settings(self, cfg) -> dict[str, str]:
        why = "tokenizer training sets what trains with viq_train.train_vit / train_quantizer / train_llm"
        out = {}
        if cfg.freeze.llm_body:
            out["freeze.llm_body"] = why
        if cfg.freeze.text_embeddings:
            out["freeze.text_embeddings"] = why
        if cfg.optim.code_embedding_lr > 0:
            out["optim.code_embedding_lr"] = "codes never enter tokenizer training (the code merger is frozen); leave it 0"
        return out

    # ---- training ---------------------------------------------------------------------------
    def apply_freezing(self) -> dict:
        """Set requires_grad from the stage config; returns what trains (logged by the trainer)."""
        c = self.cfg
        self.viq.vit.requires_grad_(c.train_vit)
        self.viq.quantizer.requires_grad_(self.stage == 2 and c.train_quantizer)
        # With model.lora only the adapters train (the code rows too stay frozen: codes never enter here).
        set_llm_trainable(self.mllm, c.train_llm, code_rows=False)
        self.mllm.merger.requires_grad_(False)  # codes never enter during tokenizer training
        if self.decoder is not None:
            self.decoder.head.requires_grad_(True)
            self.decoder.vae.requires_grad_(False)
        report = {}
        if has_lora(self.mllm.llm):
            report["llm adapters"] = check_lora_trainable(self.mllm, code_rows=False)["adapters"]
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
        lm = self.mllm({**batch, "codes": None, "image_embeds": self.projector(features)})
        aux = lm["loss_sum"].new_zeros(())
        if self.stage == 2 and "commit_loss" in out:  # quant.kind simvq: codebook and commitment terms
            aux = aux + self.viq.config.quant.commit_weight * out["commit_loss"]
            logs["commit_loss"] = float(out["commit_loss"].detach())
        if self.teacher is not None and self.cfg.distill_weight:
            distill = (1 - F.cosine_similarity(cls.float(), self._teacher_cls(pixels).float(), dim=-1)).mean()
            aux = aux + self.cfg.distill_weight * distill
            logs["distill_loss"] = float(distill.detach())
        if self.decoder is not None and self.cfg.vae_weight:
            from viq.decoder import latent_regression_loss, unnormalize_pixels, vae_latent_target

            vc = self.viq.config
            targets = vae_latent_target(self.decoder.vae, [unnormalize_pixels(p, vc.image_mean, vc.image_std) for p in pixels],
                                        grids)
            vae_loss = latent_regression_loss(self.decoder.head.latents(features, grids), targets)
            aux = aux + self.cfg.vae_weight * vae_loss
            logs["vae_latent_loss"] = float(vae_loss.detach())
        return {"loss_sum": lm["loss_sum"], "n_supervised": lm["n_supervised"], "aux_loss": aux, "logs": logs}
