"""Any-resolution ViT: native-resolution images packed into one sequence (NaViT style).

Each image contributes a class token followed by its patches; attention runs over the
packed sequence with cu_seqlens so it never crosses images. Patches are laid out in 2x2
blocks (the four patches of one 28 x 28 token are consecutive), which makes the final
2x2 merge a plain reshape. Positions: learned embeddings on a base grid, resized per image
(bilinear, align_corners=False, fp32), plus 2D RoPE inside attention. The class token sits
at no rotary position (angle 0) and has its own learned embedding.

A ViT started from a pretrained tower (viq/towers.py) switches some of this through the
config's ViT options: no RoPE (the tower's absolute grid carries position, resized with the
tower's own interpolation), a readout class token that the patches never attend to (so a
tower trained without one computes exactly its own patch features), exact GELU, RMSNorm,
QK-norm, layer scale, no final norm.

Shapes: patches [P, 3*p*p] for all images; cu_seqlens [n+1] over class + patch tokens;
output tokens [P/4, C] after the merge, class tokens [n, C].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .encode_batching import uniform_attention
from .rope import apply_rope, rope_2d_angles

QK_NORM_EPS = 1e-6  # InternViT's QK-norm uses its RMSNorm's default, whatever the layers' eps


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (InternViT's RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def block_norm(cfg, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm_type == "rms_norm" else nn.LayerNorm(dim, eps=cfg.norm_eps)


@dataclass
class Segments:
    """Who attends to whom in a packed ViT sequence.

    cu: [n+1] boundaries of each image's class + patch tokens. With a readout class token,
    also the patch / class token indices, the patch-only boundaries and [0, 1, ..., n]."""

    cu: torch.Tensor
    patch_index: torch.Tensor | None = None
    cls_index: torch.Tensor | None = None
    cu_patches: torch.Tensor | None = None
    cu_cls: torch.Tensor | None = None
    uniform_length: int = 0  # > 0: every segment has this many tokens (a size-bucketed batch)


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str = "auto", *, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.backend = backend
        self.uniform_dense = False  # equal segments: one batched SDPA call without a mask (viq/encode_batching.py)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(width, QK_NORM_EPS), RMSNorm(width, QK_NORM_EPS)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, angles, segments: Segments):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(t, "t (h d) -> t h d", h=self.heads) for t in (q, k, v))
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        if segments.cls_index is None and self.uniform_dense and segments.uniform_length:
            out = uniform_attention(q, k, v, segments.uniform_length)
        elif segments.cls_index is None:
            out = varlen_attention(q, k, v, segments.cu, backend=self.backend)
        else:  # readout class token: patches attend among themselves; each class token reads its whole image
            p, c = segments.patch_index, segments.cls_index
            patches = varlen_attention(q[p], k[p], v[p], segments.cu_patches, backend=self.backend)
            cls = varlen_attention(q[c], k, v, segments.cu_cls, backend=self.backend, cu_seqlens_k=segments.cu)
            out = torch.empty_like(q).index_copy(0, p, patches).index_copy(0, c, cls)
        return self.proj(rearrange(out, "t h d -> t (h d)"))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg.width
        self.norm1 = block_norm(cfg, width)
        self.attn = VisionAttention(width, cfg.heads, cfg.attn_backend, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm)
        self.norm2 = block_norm(cfg, width)
        hidden = cfg.mlp_hidden
        act = nn.GELU(approximate="tanh") if cfg.mlp_act == "gelu_tanh" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), act, nn.Linear(hidden, width))
        if cfg.layer_scale > 0:
            self.ls1 = nn.Parameter(torch.full((width,), float(cfg.layer_scale)))
            self.ls2 = nn.Parameter(torch.full((width,), float(cfg.layer_scale)))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x, angles, segments: Segments):
        a = self.attn(self.norm1(x), angles, segments)
        x = x + (a if self.ls1 is None else self.ls1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.ls2 is None else self.ls2 * m)


def block_order_positions(gh: int, gw: int, merge: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row / column of each patch when patches are laid out merge x merge block by block."""
    rows = torch.arange(gh, device=device).view(gh // merge, merge, 1, 1).expand(gh // merge, merge, gw // merge, merge)
    cols = torch.arange(gw, device=device).view(1, 1, gw // merge, merge).expand(gh // merge, merge, gw // merge, merge)
    rows = rows.permute(0, 2, 1, 3).reshape(-1)
    cols = cols.permute(0, 2, 1, 3).reshape(-1)
    return rows, cols


def patchify_blocks(pixels: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """[3, H, W] -> [H/p * W/p, 3*p*p], patches ordered merge x merge block by block."""
    return rearrange(
        pixels, "c (bh mh p1) (bw mw p2) -> (bh bw mh mw) (c p1 p2)", mh=merge, mw=merge, p1=patch, p2=patch
    )


class AnyResViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, c)
        self.pos_embed = nn.Parameter(torch.randn(cfg.pos_grid, cfg.pos_grid, c) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(c) * 0.02)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()  # a LayerNorm in every tower
        m2 = cfg.merge_size**2
        self.merge = nn.Sequential(
            nn.LayerNorm(m2 * c, eps=cfg.norm_eps), nn.Linear(m2 * c, c), nn.GELU(approximate="tanh"), nn.Linear(c, c)
        )
        self.gradient_checkpointing = False

    def resized_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Learned grid resized to gh x gw in fp32, laid out in block order: [gh*gw, C]."""
        grid = self.pos_embed.float().permute(2, 0, 1)[None]
        if (gh, gw) != tuple(grid.shape[-2:]):
            mode = self.cfg.pos_interpolation
            antialias = mode == "bilinear_antialias"
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic" if mode == "bicubic" else "bilinear",
                                 align_corners=False, antialias=antialias)
        m = self.cfg.merge_size
        return rearrange(grid[0], "c (bh mh) (bw mw) -> (bh bw mh mw) c", mh=m, mw=m)

    def encode(self, pixel_list: list[torch.Tensor]):
        """The blocks over the packed images: (hidden [T, C] after the final norm, is_patch [T],
        cu_seqlens [n+1], patch grids [(gh, gw)]); patches in 2x2 block order after each class token."""
        cfg = self.cfg
        p, m = cfg.patch_size, cfg.merge_size
        dtype = self.patch_embed.weight.dtype
        device = self.patch_embed.weight.device
        pieces, rows, cols, is_patch, lengths, grids = [], [], [], [], [], []
        for pixels in pixel_list:
            _, H, W = pixels.shape
            gh, gw = H // p, W // p
            patches = patchify_blocks(pixels.to(device=device, dtype=dtype), p, m)
            emb = self.patch_embed(patches) + self.resized_pos_embed(gh, gw).to(dtype)
            pieces += [self.cls_token.to(dtype)[None], emb]
            if cfg.rope:
                r, c = block_order_positions(gh, gw, m, device)
                rows += [torch.zeros(1, device=device, dtype=torch.long), r]
                cols += [torch.zeros(1, device=device, dtype=torch.long), c]
            is_patch += [torch.zeros(1, dtype=torch.bool, device=device), torch.ones(gh * gw, dtype=torch.bool, device=device)]
            lengths.append(1 + gh * gw)
            grids.append((gh, gw))
        x = torch.cat(pieces)
        is_patch = torch.cat(is_patch)
        angles = None
        if cfg.rope:
            angles = rope_2d_angles(torch.cat(rows), torch.cat(cols), c_head(cfg), cfg.rope_theta)
            angles = angles * is_patch[:, None]  # class tokens: no rotation
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
        segments = Segments(cu, uniform_length=lengths[0] if len(set(lengths)) == 1 else 0)
        if cfg.class_token == "readout":
            segments = Segments(cu, patch_index=is_patch.nonzero()[:, 0], cls_index=cu[:-1].long(),
                                cu_patches=cu - torch.arange(len(lengths) + 1, dtype=torch.int32, device=device),
                                cu_cls=torch.arange(len(lengths) + 1, dtype=torch.int32, device=device))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, angles, segments, use_reentrant=False)
            else:
                x = block(x, angles, segments)
        return self.norm(x), is_patch, cu, grids

    def forward(self, pixel_list: list[torch.Tensor]):
        """pixel_list: normalised [3, H, W] tensors -> (tokens [N, C], cls [n, C], grids [(h, w)])."""
        m = self.cfg.merge_size
        x, is_patch, cu, grids = self.encode(pixel_list)
        cls = x[cu[:-1].long()]
        patches = x[is_patch]
        tokens = self.merge(patches.reshape(-1, m * m * self.cfg.width))
        return tokens, cls, [(gh // m, gw // m) for gh, gw in grids]

    def patch_features(self, pixel_list: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ViT's features before the 2x2 merge: ([gh, gw, C] per image in raster order, cls [n, C]).
        For a loaded tower these are the tower's own last hidden states (tests/viq/test_towers.py)."""
        m = self.cfg.merge_size
        x, is_patch, cu, grids = self.encode(pixel_list)
        per_image = x[is_patch].split([gh * gw for gh, gw in grids])
        maps = [rearrange(f, "(bh bw mh mw) c -> (bh mh) (bw mw) c", bh=gh // m, bw=gw // m, mh=m, mw=m)
                for f, (gh, gw) in zip(per_image, grids)]
        return maps, x[cu[:-1].long()]


def c_head(cfg) -> int:
    return cfg.width // cfg.heads
