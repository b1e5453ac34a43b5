"""2D rotary position embedding (the Qwen2-VL vision formula).

Half of the rotary frequencies turn with the row index, half with the column index:
for head_dim D there are D/4 frequencies; angles = [row * f, col * f] (D/2 angles), each
applied to a pair of channels in the rotate-half layout. Scores q(p) . k(p') therefore
depend only on p - p' (rows and columns separately). Positions may be fractional (the
quantiser places 2x2 sub-codes at half-token offsets).

Shapes: rows, cols [N]; angles [N, D/2]; x [N, heads, D].
"""
from __future__ import annotations

import torch


def rope_2d_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(quarter, dtype=torch.float32, device=rows.device) / quarter))
    return torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by angles [N, D/2]; computed in fp32, returned in x's dtype."""
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    xf = x.float()
    out = xf * emb.cos() + _rotate_half(xf) * emb.sin()
    return out.to(x.dtype)


def grid_positions(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of every cell of an h x w grid in raster order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return rows, cols
