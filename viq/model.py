"""ViQModel: the ViQ visual tokenizer (any-resolution ViT + proximal quantiser).

    model = ViQModel.from_pretrained("viq-tiny")       # preset (random init) or a saved directory
    codes = model.encode([img_a, "b.png"])             # list of LongTensor [h, w, 4]
    feats = model.embed_codes(codes[0])                # [h, w, F] quantised features
    model.save_pretrained("out/")                      # config.json + model.safetensors

One ViQ token covers (patch_size * merge_size)^2 pixels (28 x 28 by default); its four
sub-codes are ordered (0,0), (0,1), (1,0), (1,1) within the token's 2x2 block.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, from_dict, read_json_config
from .encode_batching import plan_batches
from .errors import CheckpointError
from .fsq import codebook_stats
from .image import IMAGE_MEAN, IMAGE_STD, ResizePolicy, describe, preprocess, token_grid
from .io import atomic_path, atomic_write_json
from .quantizer import ProximalQuantizer, QuantConfig
from .ranges import ANY_FINITE, at_least, between, positive, range_errors
from .vit import AnyResViT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


VIT_CHOICES = {
    "class_token": ("joint", "readout"),
    "pos_interpolation": ("bilinear", "bicubic", "bilinear_antialias"),
    "mlp_act": ("gelu_tanh", "gelu"),
    "norm_type": ("layer_norm", "rms_norm"),
}


@dataclass
class ViQConfig:
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 448 * 448
    oversize: str = "resize"
    width: int = 192
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pos_grid: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    bottleneck_dim: int = 48
    quant_dim: int = 32
    quant_heads: int = 2
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    feature_dim: int = 192
    center_momentum: float = 0.0  # > 0: the quantiser's input centre follows the tokens (EMA) while training
    attn_backend: str = "auto"
    max_tokens_per_batch: int = 16384
    seed: int = 0

    # ---- ViT architecture options, for a ViT started from a pretrained tower (viq/towers.py).
    # The defaults are the paper's ViT trained from scratch; a config without these keys (every
    # tokenizer saved before they existed) builds exactly the same model.
    rope: bool = True  # 2D RoPE in attention; off for towers whose learned absolute grid carries position
    class_token: str = "joint"  # joint: attends and is attended to | readout: reads its image, the patches never see it
    pos_interpolation: str = "bilinear"  # resizing the position grid: bilinear | bicubic | bilinear_antialias
    mlp_dim: int = 0  # MLP hidden size; 0: int(width * mlp_ratio)
    mlp_act: str = "gelu_tanh"  # gelu_tanh | gelu (exact erf)
    norm_type: str = "layer_norm"  # normalisation in the blocks: layer_norm | rms_norm
    qkv_bias: bool = True
    qk_norm: bool = False  # RMSNorm over the width on queries and keys before the head split (InternViT-6B)
    layer_scale: float = 0.0  # > 0: learned per-channel scales on both residual branches, initialised to this
    final_norm: bool = True  # normalise after the last block (SigLIP's post-LayerNorm); InternViT has none
    image_mean: list[float] = field(default_factory=lambda: list(IMAGE_MEAN))  # pixel normalisation the ViT expects
    image_std: list[float] = field(default_factory=lambda: list(IMAGE_STD))

    # ---- quantiser ablation switches (viq/quantizer.py QuantConfig; docs/ablation.md). The defaults
    # are the paper's quantiser; a config without `quant` builds exactly the same model.
    quant: QuantConfig = field(default_factory=QuantConfig)

    RANGES: ClassVar[dict] = {
        "patch_size": positive(), "merge_size": positive(), "min_pixels": positive(), "max_pixels": positive(),
        "width": positive(), "depth": positive(), "heads": positive(), "mlp_ratio": positive(), "pos_grid": positive(),
        "rope_theta": positive(), "norm_eps": positive(), "bottleneck_dim": positive(), "quant_dim": positive(),
        "quant_heads": positive(), "levels": at_least(2), "feature_dim": positive(),
        "center_momentum": between(0, 1, high_open=True), "max_tokens_per_batch": positive(), "seed": at_least(0),
        "mlp_dim": at_least(0), "layer_scale": at_least(0), "image_mean": ANY_FINITE, "image_std": positive(),
    }

    def __post_init__(self):
        errors = range_errors(self, "viq")
        if errors:
            raise ConfigError("\n".join(errors))
        if self.oversize not in ("resize", "error"):
            raise ConfigError(f"viq.oversize must be 'resize' or 'error', got '{self.oversize}'")
        if self.width % self.heads:
            raise ConfigError(f"viq.width {self.width} is not divisible by viq.heads {self.heads}")
        if self.rope and (self.width // self.heads) % 4:
            raise ConfigError(f"viq.width {self.width} / heads {self.heads} must give a head dim divisible by 4 (2D RoPE)")
        if self.quant_dim % self.quant_heads or (self.quant_dim // self.quant_heads) % 4:
            raise ConfigError(f"viq.quant_dim {self.quant_dim} / quant_heads {self.quant_heads} must give a head dim "
                              "divisible by 4")
        if not self.levels or any(int(level) < 2 for level in self.levels):
            raise ConfigError(f"viq.levels must all be >= 2, got {list(self.levels)}")
        for key, valid in VIT_CHOICES.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"viq.{key} is '{getattr(self, key)}'; valid values: {', '.join(valid)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(f"viq.image_mean / image_std must be 3 values each (std > 0), got {self.image_mean} / {self.image_std}")

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or int(self.width * self.mlp_ratio)

    @property
    def codebook_size(self) -> int:
        if self.quant.kind == "simvq" and self.quant.simvq_codebook_size:
            return self.quant.simvq_codebook_size
        return math.prod(self.levels)

    @property
    def resize_policy(self) -> ResizePolicy:
        return ResizePolicy(self.patch_size, self.merge_size, self.min_pixels, self.max_pixels, self.oversize,
                            tuple(self.image_mean), tuple(self.image_std))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "", source: str | None = None) -> "ViQConfig":
        return from_dict(cls, d, where, source)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ViQConfig":
        """The config.json of a saved ViQ tokenizer directory."""
        cfg_file = os.path.join(str(directory), CONFIG_NAME)
        raw = read_json_config(cfg_file, f"{directory}: not a ViQ tokenizer directory (missing {CONFIG_NAME})")
        return cls.from_dict(raw, source=cfg_file)


VIQ_PRESETS: dict[str, ViQConfig] = {
    # A few M parameters: tests and the CPU demo.
    "viq-tiny": ViQConfig(),
    # The paper's scale (~1.3B): a 2048-wide, 24-deep ViT plus the quantiser; random init.
    "viq-1.3b": ViQConfig(
        width=2048, depth=25, heads=16, bottleneck_dim=512, quant_dim=128, quant_heads=4,
        levels=[8, 8, 8, 5, 5, 5], feature_dim=2048, max_pixels=1792 * 1792, min_pixels=56 * 56,
        pos_grid=32,
    ),
    # ViTs shaped to start from a released tower (viq_train.init_vit_from, viq/towers.py): the
    # tower's architecture and pixel normalisation, the quantiser sized as viq-1.3b's; random init.
    # SigLIP-so400m-patch14-384 as LLaVA-OneVision uses it: 26 of its 27 blocks, no post-LayerNorm.
    "viq-siglip-so400m": ViQConfig(
        width=1152, depth=26, heads=16, mlp_dim=4304, pos_grid=27, rope=False, class_token="readout",
        pos_interpolation="bicubic", final_norm=False, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        bottleneck_dim=512, quant_dim=128, quant_heads=4, levels=[8, 8, 8, 5, 5, 5], feature_dim=1152,
        max_pixels=1792 * 1792, min_pixels=56 * 56,
    ),
    # SigLIP2-so400m-patch16-naflex: 16 px patches (one token = 32 x 32 px), a 16 x 16 grid resized per image.
    "viq-siglip2-so400m": ViQConfig(
        patch_size=16, width=1152, depth=27, heads=16, mlp_dim=4304, pos_grid=16, rope=False, class_token="readout",
        pos_interpolation="bilinear_antialias", image_mean=[0.5] * 3, image_std=[0.5] * 3,
        bottleneck_dim=512, quant_dim=128, quant_heads=4, levels=[8, 8, 8, 5, 5, 5], feature_dim=1152,
        max_pixels=2048 * 2048, min_pixels=64 * 64,
    ),
    # InternViT-300M-448px (InternVL 2.5 / 3), as transformers' InternVLVisionModel holds it.
    "viq-internvit-300m": ViQConfig(
        width=1024, depth=24, heads=16, mlp_dim=4096, pos_grid=32, rope=False, pos_interpolation="bicubic",
        mlp_act="gelu", layer_scale=0.1, final_norm=False, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        bottleneck_dim=512, quant_dim=128, quant_heads=4, levels=[8, 8, 8, 5, 5, 5], feature_dim=1024,
        max_pixels=1792 * 1792, min_pixels=56 * 56,
    ),
}


def get_preset(name: str) -> ViQConfig:
    if name not in VIQ_PRESETS:
        raise ConfigError(f"unknown ViQ preset '{name}'; valid presets: {', '.join(VIQ_PRESETS)}")
    return copy.deepcopy(VIQ_PRESETS[name])  # deep: the nested `quant` is not shared with the preset


class ViQModel(nn.Module):
    def __init__(self, config: ViQConfig):
        super().__init__()
        self.config = config
        self.vit = AnyResViT(config)
        self.quantizer = ProximalQuantizer(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.vit.patch_embed.weight.device

    # ---- construction / persistence -------------------------------------------------
    @classmethod
    def from_config(cls, config: ViQConfig) -> "ViQModel":
        # Deterministic random init: the same preset gives the same tokenizer everywhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return cls(config)

    @classmethod
    def from_pretrained(cls, path_or_preset: str | os.PathLike, device=None, dtype=None) -> "ViQModel":
        path = str(path_or_preset)
        if os.path.isdir(path):
            config = ViQConfig.load(path)
            with torch.device("meta"):
                model = cls(config)
            weights = os.path.join(path, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}; save the tokenizer with ViQModel.save_pretrained")
            state = load_file(weights)
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            if missing or unexpected:
                raise CheckpointError(f"{weights}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}; "
                                      f"the weights do not belong to {os.path.join(path, CONFIG_NAME)}")
            model._rebuild_buffers()
        elif path in VIQ_PRESETS:
            model = cls.from_config(get_preset(path))
        else:
            raise ConfigError(
                f"'{path}' is neither a ViQ tokenizer directory nor a preset; valid presets: {', '.join(VIQ_PRESETS)}"
            )
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    def _rebuild_buffers(self):
        # Non-persistent buffers are not in the checkpoint; recompute them after a meta-device load.
        from .fsq import FSQ

        if self.config.quant.kind == "fsq":  # SimVQ's codebook is persistent: loaded with the weights
            self.quantizer.fsq = FSQ(self.config.levels)

    def save_pretrained(self, path: str | os.PathLike):
        """Weights, then config.json, each written atomically: a crash leaves the previous files."""
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(path, WEIGHTS_NAME)) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_json(os.path.join(path, CONFIG_NAME), {"model_type": "viq", **self.config.to_dict()}, indent=2)

    # ---- forward passes -------------------------------------------------------------
    def preprocess(self, images: list[Any], names: list[str] | None = None) -> list[torch.Tensor]:
        policy = self.config.resize_policy
        names = names or [None] * len(images)
        return [preprocess(img, policy, name) for img, name in zip(images, names)]

    def token_grid(self, height: int, width: int, name: str = "image") -> tuple[int, int]:
        return token_grid(height, width, self.config.resize_policy, name)

    def forward(self, pixel_list: list[torch.Tensor]) -> dict:
        """Training forward over preprocessed images [3, H, W].

        Returns features [N, C] (continuous, merged tokens), quantized [N, F], bottleneck
        [N, D] (None with quant.proximal false), class_tokens [n, C], indices [N, 4], grids
        [(h, w)], cu_seqlens [n+1], codebook statistics, and commit_loss with quant.kind simvq.
        """
        tokens, cls, grids = self.vit(pixel_list)
        counts = torch.tensor([h * w for h, w in grids], device=tokens.device)
        cu = torch.zeros(len(grids) + 1, dtype=torch.int32, device=tokens.device)
        cu[1:] = torch.cumsum(counts, 0)
        q = self.quantizer(tokens, grids, cu)
        return {
            "features": tokens,
            "quantized": q["quantized"],
            "bottleneck": q["bottleneck"],
            "class_tokens": cls,
            "indices": q["indices"],
            "grids": grids,
            "cu_seqlens": cu,
            "stats": codebook_stats(q["indices"], self.codebook_size),
            **({"commit_loss": q["commit_loss"]} if "commit_loss" in q else {}),
        }

    @torch.no_grad()
    def encode_pixels(self, pixel_list: list[torch.Tensor], bucket: bool = False) -> list[torch.Tensor]:
        """Preprocessed images -> list of int64 [h, w, 4] codes (input order), batched by a token
        budget; `bucket`: same-size images batched together (viq/encode_batching.py)."""
        out: list[torch.Tensor | None] = [None] * len(pixel_list)
        p2 = self.config.patch_size**2
        counts = [p.shape[1] * p.shape[2] // p2 for p in pixel_list]
        for batch in plan_batches(counts, self.config.max_tokens_per_batch, bucket):
            res = self.forward([pixel_list[i] for i in batch])
            for i, (h, w), idx in zip(batch, res["grids"], res["indices"].split([h * w for h, w in res["grids"]])):
                out[i] = idx.reshape(h, w, 4).cpu()
        return out

    def encode(self, images: list[Any], names: list[str] | None = None) -> list[torch.Tensor]:
        """Images (paths, PIL, arrays, tensors, bytes) -> list of int64 [h, w, 4] code tensors."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"encode expects a list of images, got {describe(images)}")
        was_training = self.training
        self.eval()
        try:
            return self.encode_pixels(self.preprocess(list(images), names))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., 4] (FSQ indices) -> quantised features [..., F]."""
        codes = torch.as_tensor(codes)
        if codes.shape[-1] != 4:
            raise ValueError(f"codes must end in the 4 sub-codes of a token, got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return self.quantizer.embed_indices(codes)

    def codebook_vectors(self, chunk: int = 65536) -> torch.Tensor:
        """The implicit FSQ codebook as code values [K, L] (chunked; K = prod(levels))."""
        return torch.cat([c for _, c in self.quantizer.code_quantizer.iter_codebook(chunk)])
