"""ViQ codes -> pixels through a VAE: the stage-2 "VAE-latent reconstruction" of the ViQ paper.

A LatentHead regresses, from each quantised token feature, the latent cells of a frozen VAE
(downsampling factor 8) applied to the image resized so that one token covers 32 x 32 px: every
token (28 x 28 px in the ViQ grid) maps to a 4 x 4 patch of latent cells, so an image of h x w
tokens has latents [C_lat, 4h, 4w]. Decoding runs the VAE's decoder on the predicted latents and
resizes the result back to the token grid's pixel size (28h x 28w).

    decoder = ViQDecoder.from_pretrained(viq_dir)                 # viq_dir/decoder/{config.json, latent_head.safetensors, vae/}
    images = decoder.decode_codes(viq_model, codes_list)          # list of uint8 [3, 28h, 28w]
    originals, recons = decoder.reconstruct(viq_model, images)    # encode -> decode, both uint8
    targets = vae_latent_target(decoder.vae, pixels_list, grids)  # the regression target in training

Shapes: features [N, F] (N = h*w tokens of one image, raster order); head output [N, C, 4, 4];
latents [C, 4h, 4w]; VAE pixels in [-1, 1]. Latents are (mean - shift_factor) * scaling_factor of
the VAE's posterior, as latent-diffusion models use them.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, from_dict, read_json_config
from .errors import CheckpointError, MissingDependencyError
from .image import IMAGE_MEAN, IMAGE_STD, load_image, target_size
from .io import atomic_path, atomic_write_json

VAE_DOWNSAMPLE = 8
VAE_TOKEN_PIXELS = 32  # one token's side in the VAE's input image
LATENT_PATCH = VAE_TOKEN_PIXELS // VAE_DOWNSAMPLE  # 4 x 4 latent cells per token
DECODER_DIR = "decoder"
DECODER_CONFIG = "config.json"
HEAD_WEIGHTS = "latent_head.safetensors"
VAE_DIR = "vae"


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MissingDependencyError("the ViQ decoder needs diffusers: pip install -e '.[recon]'") from None
    return AutoencoderKL


@dataclass
class DecoderConfig:
    feature_dim: int = 192
    latent_channels: int = 4
    hidden_size: int = 512
    depth: int = 2
    norm_eps: float = 1e-6

    def __post_init__(self):
        for key in ("feature_dim", "latent_channels", "hidden_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"decoder.{key} must be positive, got {getattr(self, key)}")
        if self.depth < 0:
            raise ConfigError(f"decoder.depth must be >= 0, got {self.depth}")

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "DecoderConfig":
        return from_dict(cls, d, "decoder", source)


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class LatentHead(nn.Module):
    """Quantised token features [N, F] -> VAE latent patches [N, C_lat, 4, 4] (a per-token MLP)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(config.feature_dim, config.hidden_size)
        self.blocks = nn.ModuleList(ResidualMLP(config.hidden_size, config.norm_eps) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.proj_out = nn.Linear(config.hidden_size, config.latent_channels * LATENT_PATCH**2)
        # Zero output at init: a random head's large errors would otherwise flood the quantiser
        # with gradients that pull every token to one code (observed: usage 3% -> 0.1%).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.config.feature_dim:
            raise ValueError(f"LatentHead expects features [N, {self.config.feature_dim}], got {tuple(features.shape)}")
        x = self.proj_in(features)
        for block in self.blocks:
            x = block(x)
        x = self.proj_out(self.norm_out(x))
        return rearrange(x, "n (c p q) -> n c p q", c=self.config.latent_channels, p=LATENT_PATCH)

    def latents(self, features: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Features of several images concatenated ([sum h*w, F], raster order) -> [C, 4h, 4w] each."""
        counts = [h * w for h, w in grids]
        if sum(counts) != features.shape[0]:
            raise ValueError(f"grids {list(grids)} cover {sum(counts)} tokens, features have {features.shape[0]}")
        patches = self(features).split(counts)
        return [rearrange(p, "(h w) c p q -> c (h p) (w q)", h=h, w=w) for p, (h, w) in zip(patches, grids)]


def latent_regression_loss(predicted: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean squared error over all latent cells of all images (the stage-2 reconstruction loss)."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predicted latents for {len(targets)} targets")
    for i, (p, t) in enumerate(zip(predicted, targets)):
        if p.shape != t.shape:
            raise ValueError(f"image {i}: predicted latents {tuple(p.shape)} vs target {tuple(t.shape)}")
    sq = sum(((p.float() - t.float()) ** 2).sum() for p, t in zip(predicted, targets))
    return sq / sum(t.numel() for t in targets)


def _vae_factors(vae) -> tuple[float, float]:
    shift = vae.config.shift_factor
    return float(vae.config.scaling_factor), float(shift) if shift is not None else 0.0


def _check_vae(vae, source: str = "VAE") -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != VAE_DOWNSAMPLE:
        raise ConfigError(
            f"{source}: downsampling factor {factor} ({len(vae.config.block_out_channels)} blocks); "
            f"the latent head needs {VAE_DOWNSAMPLE} (4 blocks)"
        )


def to_unit_pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float [0, 1]; float tensors are taken to be in [0, 1] already."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got {tuple(image.shape)}")
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def unnormalize_pixels(pixels: torch.Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """ViQModel.preprocess output ([3, H, W] normalised with the tokenizer's `image_mean` /
    `image_std`, CLIP's by default) -> [0, 1] pixels for vae_latent_target."""
    mean = torch.tensor(mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() * std + mean).clamp(0, 1)


@torch.no_grad()
def vae_latent_target(vae, pixels_list: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Stage-2 regression target: each image (uint8 or [0, 1] float [3, H, W]) resized to
    (32h, 32w), encoded; latents = (posterior mean - shift) * scaling_factor, [C, 4h, 4w] each."""
    if len(pixels_list) != len(grids):
        raise ValueError(f"{len(pixels_list)} images for {len(grids)} grids")
    _check_vae(vae)
    scale, shift = _vae_factors(vae)
    param = next(vae.parameters())
    out: list[torch.Tensor] = [None] * len(grids)  # type: ignore[list-item]
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grids):
        by_grid.setdefault(tuple(g), []).append(i)
    for (h, w), idx in by_grid.items():
        batch = torch.stack([
            F.interpolate(to_unit_pixels(pixels_list[i])[None], size=(h * VAE_TOKEN_PIXELS, w * VAE_TOKEN_PIXELS),
                          mode="bicubic", align_corners=False, antialias=True)[0]
            for i in idx
        ]).clamp(0, 1)
        mean = vae.encode((batch * 2 - 1).to(param.device, param.dtype)).latent_dist.mean
        for j, i in enumerate(idx):
            out[i] = ((mean[j] - shift) * scale).float()
    return out


def tiny_vae(seed: int = 0):
    """A tiny random AutoencoderKL (downsampling 8, 4 latent channels, ~80k parameters) for tests and demos."""
    AutoencoderKL = _autoencoder_kl()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            # scaling as real VAEs choose it: latents of about unit variance (measured on the
            # synthetic demo images: raw std ~0.18), so the latent loss is not just the mean.
            sample_size=64, scaling_factor=5.5,
        ).eval()


class ViQDecoder(nn.Module):
    """LatentHead + a frozen diffusers AutoencoderKL: ViQ codes -> RGB pixels."""

    def __init__(self, config: DecoderConfig, vae):
        super().__init__()
        _check_vae(vae)
        if vae.config.latent_channels != config.latent_channels:
            raise ConfigError(
                f"decoder.latent_channels is {config.latent_channels} but the VAE has {vae.config.latent_channels}"
            )
        self.config = config
        self.head = LatentHead(config)
        self.vae = vae.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.head.proj_in.weight.device

    # ---- construction / persistence -------------------------------------------------
    @classmethod
    def from_vae(cls, vae_or_path: Any, feature_dim: int, hidden_size: int = 512, depth: int = 2, seed: int = 0):
        """A fresh (untrained) head in front of a VAE object or a LOCAL AutoencoderKL directory."""
        vae = vae_or_path
        if isinstance(vae_or_path, (str, os.PathLike)):
            vae = load_vae(vae_or_path)
        config = DecoderConfig(feature_dim=feature_dim, latent_channels=vae.config.latent_channels,
                               hidden_size=hidden_size, depth=depth)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, vae)

    def save_pretrained(self, viq_dir: str | os.PathLike) -> str:
        """Write viq_dir/decoder/{config.json, latent_head.safetensors, vae/}; returns that folder."""
        folder = os.path.join(str(viq_dir), DECODER_DIR)
        os.makedirs(folder, exist_ok=True)
        self.vae.save_pretrained(os.path.join(folder, VAE_DIR))
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        with atomic_path(os.path.join(folder, HEAD_WEIGHTS)) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        # config.json last: its presence is what marks a complete decoder.
        atomic_write_json(os.path.join(folder, DECODER_CONFIG),
                          {"model_type": "viq-latent-decoder", **asdict(self.config)}, indent=2)
        return folder

    @classmethod
    def from_pretrained(cls, viq_dir: str | os.PathLike, device=None) -> "ViQDecoder":
        folder = os.path.join(str(viq_dir), DECODER_DIR)
        cfg_file = os.path.join(folder, DECODER_CONFIG)
        raw = read_json_config(
            cfg_file,
            f"{viq_dir}: this ViQ tokenizer has no decoder (missing {DECODER_DIR}/{DECODER_CONFIG}); "
            "train one or attach one with ViQDecoder.save_pretrained",
        )
        config = DecoderConfig.from_dict(raw, source=cfg_file)
        vae = load_vae(os.path.join(folder, VAE_DIR))
        decoder = cls(config, vae)
        weights = os.path.join(folder, HEAD_WEIGHTS)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{folder}: missing {HEAD_WEIGHTS}; save the decoder with ViQDecoder.save_pretrained")
        missing, unexpected = decoder.head.load_state_dict(load_file(weights), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{weights}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}; "
                                  f"the weights do not belong to {cfg_file}")
        decoder.eval()
        return decoder.to(device) if device is not None else decoder

    # ---- decoding -------------------------------------------------------------------
    @torch.no_grad()
    def latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, 4h, 4w] (scaled) -> VAE output [B, 3, 32h, 32w] in about [-1, 1]."""
        scale, shift = _vae_factors(self.vae)
        param = next(self.vae.parameters())
        return self.vae.decode((latents / scale + shift).to(param.device, param.dtype)).sample.float()

    @torch.no_grad()
    def decode_latents(self, latents_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Latents [C, 4h, 4w] each -> uint8 images [3, 28h, 28w] (the ViQ grid's pixel size)."""
        out = []
        for lat in latents_list:
            h, w = lat.shape[-2] // LATENT_PATCH, lat.shape[-1] // LATENT_PATCH
            pixels = self.latents_to_pixels(lat[None])
            pixels = F.interpolate(pixels, size=(h * 28, w * 28), mode="bicubic", align_corners=False, antialias=True)
            unit = ((pixels[0] + 1) / 2).clamp(0, 1)
            out.append((unit * 255).round().to(torch.uint8).cpu())
        return out

    @torch.no_grad()
    def decode_codes(self, viq_model, codes_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """ViQ codes [h, w, 4] each -> uint8 images [3, h*28, w*28]."""
        factor = viq_model.config.patch_size * viq_model.config.merge_size
        if factor != 28:
            raise ConfigError(f"the latent head assumes 28-px tokens, this ViQ tokenizer has {factor}-px tokens")
        if viq_model.config.feature_dim != self.config.feature_dim:
            raise ConfigError(
                f"decoder.feature_dim {self.config.feature_dim} does not match the tokenizer's feature_dim "
                f"{viq_model.config.feature_dim}"
            )
        latents = []
        for codes in codes_list:
            feats = viq_model.embed_codes(codes)  # [h, w, F]
            h, w = feats.shape[:2]
            flat = rearrange(feats, "h w f -> (h w) f").to(self.device, self.head.proj_in.weight.dtype)
            latents.append(self.head.latents(flat, [(h, w)])[0])
        return self.decode_latents(latents)

    @torch.no_grad()
    def reconstruct(self, viq_model, images: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images (anything viq.image.load_image takes) -> (originals resized by the tokenizer's
        policy, reconstructions), both uint8 [3, 28h, 28w] and pixel-aligned."""
        policy = viq_model.config.resize_policy
        originals, pils = [], []
        for i, img in enumerate(images):
            pil = load_image(img)
            h, w = target_size(pil.size[1], pil.size[0], policy, f"image {i}")
            if (pil.size[1], pil.size[0]) != (h, w):
                pil = pil.resize((w, h), Image.BICUBIC)  # the same resize viq.image.preprocess does
            pils.append(pil)
            originals.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))
        codes = viq_model.encode(pils)
        return originals, self.decode_codes(viq_model, codes)


def load_vae(path: str | os.PathLike):
    """AutoencoderKL from a LOCAL directory (never a hub download), checked to downsample by 8."""
    path = str(path)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path}: not a local AutoencoderKL directory (needs config.json and weights)")
    AutoencoderKL = _autoencoder_kl()
    # low_cpu_mem_usage=False: the default path wants `accelerate`, which we do not need for a VAE.
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False).eval()
    _check_vae(vae, path)
    return vae
