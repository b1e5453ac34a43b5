"""Variable-length attention over a packed sequence: attention never crosses segments.

Backends (a plain dict registry): `flash` (flash-attn varlen, when importable, CUDA),
`flex` (FlexAttention with a document mask, CUDA), `sdpa` (scaled_dot_product_attention
with a block-diagonal boolean mask; the CPU path since FlexAttention has no CPU backward).
`auto` picks the first that applies. Segments are given by cu_seqlens [n+1] (int32).

Shapes: q [Tq, heads, D], k and v [Tk, heads, D]; out [Tq, heads, D]. With separate
`cu_seqlens_k`, query segment i attends to key segment i (used by the quantiser's 2x2
expansion, whose queries outnumber its keys four to one).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .errors import ConfigError


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)


def sdpa_varlen(q, k, v, cu_q, cu_k):
    """Block-diagonal attention. Short packs use one masked call; long packs run segment by
    segment, which is the same computation without the wasted off-diagonal blocks."""
    if q.shape[0] > 4096 and len(cu_q) > 2:
        bq, bk = cu_q.tolist(), cu_k.tolist()
        outs = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
            ).transpose(0, 1)
            for a, b, c, d in zip(bq[:-1], bq[1:], bk[:-1], bk[1:])
        ]
        return torch.cat(outs)
    seg_q = _segment_ids(cu_q, q.shape[0])
    seg_k = _segment_ids(cu_k, k.shape[0])
    mask = seg_q[:, None] == seg_k[None, :]  # [Tq, Tk] built on the device, bool
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask[None, None]
    )
    return out[0].transpose(0, 1)


_flex_compiled = None
FLEX_BLOCK = 128  # FlexAttention's default block size


def _block_ranges(seg: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of `block` tokens: first segment, last segment, and whether the block is complete."""
    n = seg.shape[0]
    starts = torch.arange(0, n, block, device=seg.device)
    ends = (starts + block - 1).clamp(max=n - 1)
    return seg[starts], seg[ends], (starts + block) <= n


def document_block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, q_len: int, k_len: int, block: int = FLEX_BLOCK):
    """The FlexAttention BlockMask of "query segment i attends to key segment i", built from the
    segment boundaries alone. `create_block_mask` would first materialise the dense [Tq, Tk] mask
    (79k tokens of 77 images: 6 GB); here only the [Tq/128, Tk/128] block grid is ever built.
    Segments are contiguous and ascending, so two blocks interact iff their segment ranges
    overlap, and a complete pair of blocks inside one segment is fully unmasked."""
    from torch.nn.attention.flex_attention import BlockMask

    seg_q, seg_k = _segment_ids(cu_q, q_len), _segment_ids(cu_k, k_len)
    q_first, q_last, q_whole = _block_ranges(seg_q, block)
    k_first, k_last, k_whole = _block_ranges(seg_k, block)
    touch = (q_first[:, None] <= k_last[None, :]) & (k_first[None, :] <= q_last[:, None])
    full = (q_first == q_last)[:, None] & (k_first == k_last)[None, :] & (q_first[:, None] == k_first[None, :])
    full &= q_whole[:, None] & k_whole[None, :]
    partial = touch & ~full

    def listed(blocks):  # [nq, nk] bool -> counts [1, 1, nq] and indices [1, 1, nq, nk], listed blocks first
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return blocks.sum(-1, dtype=torch.int32)[None, None], order[None, None]

    def same_segment(b, h, qi, ki):
        return seg_q[qi] == seg_k[ki]

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=same_segment,
                                    seq_lengths=(q_len, k_len))


def flex_varlen(q, k, v, cu_q, cu_k):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=True)
    block_mask = document_block_mask(cu_q, cu_k, q.shape[0], k.shape[0])
    out = _flex_compiled(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask
    )
    return out[0].transpose(0, 1)


def flash_varlen(q, k, v, cu_q, cu_k):
    from flash_attn import flash_attn_varlen_func

    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int((cu_k[1:] - cu_k[:-1]).max())
    return flash_attn_varlen_func(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, causal=False)


BACKENDS = {"sdpa": sdpa_varlen, "flex": flex_varlen, "flash": flash_varlen}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    if name not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown attention backend '{name}' (viq.attn_backend); valid: auto, {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None and dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "flex"
    return "sdpa"


def varlen_attention(q, k, v, cu_seqlens, backend: str = "auto", cu_seqlens_k=None):
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    name = resolve_backend(backend, q.device, q.dtype)
    return BACKENDS[name](q, k, v, cu_seqlens, cu_k)
