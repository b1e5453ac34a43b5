"""Any-resolution ViT: native-resolution images packed into one sequence (NaViT style).

Each image contributes a class token followed by its patches; attention runs over the
packed sequence with cu_seqlens so it never crosses images. Patches are laid out in 2x2
blocks (the four patches of one 28 x 28 token are consecutive), which makes the final
2x2 merge a plain reshape. Positions: learned embeddings on a base grid, resized per image
(bilinear, align_corners=False, fp32), plus 2D RoPE inside attention. The class token sits
at no rotary position (angle 0) and has its own learned embedding.

Shapes: patches [P, 3*p*p] for all images; cu_seqlens [n+1] over class + patch tokens;
output tokens [P/4, C] after the merge, class tokens [n, C].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .rope import apply_rope, rope_2d_angles


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, angles, cu_seqlens):
        q, k, v = rearrange(self.qkv(x), "t (three h d) -> three t h d", three=3, h=self.heads)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        out = varlen_attention(q, k, v, cu_seqlens, backend=self.backend)
        return self.proj(rearrange(out, "t h d -> t (h d)"))


class VisionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = VisionAttention(width, heads, backend)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x, angles, cu_seqlens):
        x = x + self.attn(self.norm1(x), angles, cu_seqlens)
        return x + self.mlp(self.norm2(x))


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
        self.blocks = nn.ModuleList(
            [VisionBlock(c, cfg.heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_backend) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        m2 = cfg.merge_size**2
        self.merge = nn.Sequential(
            nn.LayerNorm(m2 * c, eps=cfg.norm_eps), nn.Linear(m2 * c, c), nn.GELU(approximate="tanh"), nn.Linear(c, c)
        )
        self.gradient_checkpointing = False

    def resized_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Learned grid resized to gh x gw in fp32, laid out in block order: [gh*gw, C]."""
        grid = self.pos_embed.float().permute(2, 0, 1)[None]
        if (gh, gw) != tuple(grid.shape[-2:]):
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        m = self.cfg.merge_size
        return rearrange(grid[0], "c (bh mh) (bw mw) -> (bh bw mh mw) c", mh=m, mw=m)

    def forward(self, pixel_list: list[torch.Tensor]):
        """pixel_list: normalised [3, H, W] tensors -> (tokens [N, C], cls [n, C], grids [(h, w)])."""
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
            r, c = block_order_positions(gh, gw, m, device)
            rows += [torch.zeros(1, device=device, dtype=torch.long), r]
            cols += [torch.zeros(1, device=device, dtype=torch.long), c]
            is_patch += [torch.zeros(1, dtype=torch.bool, device=device), torch.ones(gh * gw, dtype=torch.bool, device=device)]
            lengths.append(1 + gh * gw)
            grids.append((gh // m, gw // m))
        x = torch.cat(pieces)
        is_patch = torch.cat(is_patch)
        angles = rope_2d_angles(torch.cat(rows), torch.cat(cols), c_head(cfg), cfg.rope_theta)
        angles = angles * is_patch[:, None]  # class tokens: no rotation
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, angles, cu, use_reentrant=False)
            else:
                x = block(x, angles, cu)
        x = self.norm(x)
        cls = x[cu[:-1].long()]
        patches = x[is_patch]
        tokens = self.merge(patches.reshape(-1, m * m * cfg.width))
        return tokens, cls, grids


def c_head(cfg) -> int:
    return cfg.width // cfg.heads
