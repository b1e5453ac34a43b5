"""Continuous vision encoders + MLP projector: the baseline that cached codes are compared with.

These are architecture stand-ins with the published shapes (random init, no weights): what a
LLaVA / InternVL-style training step runs when the vision tower is in the loop.

- `internvit-300m`: InternViT-300M-448px (width 1024, depth 24, 16 heads, MLP 4096, patch 14,
  class token, layer scale), pixel-shuffled 2x2 -> 256 tokens per 448 px image, InternVL's
  projector LayerNorm -> Linear -> GELU -> Linear.
- `siglip-so400m`: SigLIP-so400m-patch14 (width 1152, depth 27, 16 heads, MLP 4304, patch 14,
  no class token, post-LayerNorm). LLaVA-OneVision feeds 729 tokens per 384 px crop; here the
  encoder sees the same 448 px images as the others and its patches are merged 2x2 as well, so
  that every arm hands the LLM exactly the same number of image positions and the comparison
  measures the encoder alone.

Patches are merged in 2x2 blocks, row-major over the merged grid: the same order as the
`image_pad` rows of the ViQ image layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class EncoderSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int = 14
    merge: int = 2  # m x m patches -> one LLM position (pixel shuffle)
    native_size: int = 448  # the position-embedding grid's image side
    class_token: bool = False
    layer_scale: bool = False


CONTINUOUS_ENCODERS: dict[str, EncoderSpec] = {
    "internvit-300m": EncoderSpec(1024, 24, 16, 4096, native_size=448, class_token=True, layer_scale=True),
    "siglip-so400m": EncoderSpec(1152, 27, 16, 4304, native_size=384),
    # CPU-sized versions of the two, for tests and the tiny benchmark mode
    "internvit-tiny": EncoderSpec(64, 2, 4, 256, native_size=112, class_token=True, layer_scale=True),
    "siglip-tiny": EncoderSpec(72, 3, 4, 272, native_size=112),
}


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in CONTINUOUS_ENCODERS:
        raise ValueError(f"unknown continuous encoder {name!r}; valid: {', '.join(CONTINUOUS_ENCODERS)}")
    return CONTINUOUS_ENCODERS[name]


class _Block(nn.Module):
    def __init__(self, spec: EncoderSpec):
        super().__init__()
        d = spec.width
        self.heads = spec.heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, spec.mlp_dim), nn.Linear(spec.mlp_dim, d)
        self.ls1 = nn.Parameter(torch.full((d,), 0.1)) if spec.layer_scale else None
        self.ls2 = nn.Parameter(torch.full((d,), 0.1)) if spec.layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class ContinuousEncoder(nn.Module):
    """[N, 3, S, S] images -> [N * (S / (patch * merge))^2, width * merge^2] features."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        d, p = spec.width, spec.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        grid = spec.native_size // p
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, d) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.class_token else None
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.depth))
        self.post_norm = nn.LayerNorm(d, eps=1e-6)
        self.checkpointing = False

    @property
    def out_dim(self) -> int:
        return self.spec.width * self.spec.merge**2

    def tokens_per_image(self, image_size: int) -> int:
        return (image_size // (self.spec.patch_size * self.spec.merge)) ** 2

    def _positions(self, grid: int, dtype) -> torch.Tensor:
        native = round(self.pos_embed.shape[1] ** 0.5)
        pos = self.pos_embed
        if grid != native:  # resized in fp32, as the released encoders do for other resolutions
            pos = pos.float().reshape(1, native, native, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return pos.to(dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        side = pixels.shape[-1]
        if pixels.shape[-2] != side or side % (spec.patch_size * spec.merge):
            raise ValueError(f"images must be square with a side divisible by {spec.patch_size * spec.merge}; got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        grid = side // spec.patch_size
        x = x + self._positions(grid, x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.post_norm(x)
        if self.cls_token is not None:
            x = x[:, 1:]
        return merge_patches(x, grid, spec.merge)


def merge_patches(x: torch.Tensor, grid: int, m: int) -> torch.Tensor:
    """[N, grid*grid, D] row-major patches -> [N * (grid/m)^2, m*m*D]: each m x m block concatenated
    (top-left, top-right, ..., row by row), blocks row-major."""
    n, _, d = x.shape
    g = grid // m
    x = x.view(n, g, m, g, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * g * g, m * m * d)


def mlp_projector(in_dim: int, hidden: int) -> nn.Module:
    """InternVL's `mlp1`: LayerNorm -> Linear -> GELU -> Linear (LLaVA's drops the LayerNorm)."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def encoder_forward_flops(spec: EncoderSpec, image_size: int, n_images: int, llm_hidden: int) -> float:
    """Matmul FLOPs of one forward pass over n_images square images, projector included."""
    d, p = spec.width, spec.patch_size
    t = (image_size // p) ** 2 + (1 if spec.class_token else 0)
    per_block = 2 * t * (4 * d * d + 2 * d * spec.mlp_dim) + 4 * t * t * d
    patch = 2 * (image_size // p) ** 2 * 3 * p * p * d
    merged = (image_size // (p * spec.merge)) ** 2
    projector = 2 * merged * (spec.merge**2 * d * llm_hidden + llm_hidden * llm_hidden)
    return float(n_images * (spec.depth * per_block + patch + projector))
