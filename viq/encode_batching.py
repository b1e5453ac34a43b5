"""How images are grouped into encoder batches, and the attention levers of no-gradient encoding.

Encoding has no backward pass, so the only constraint on a batch is memory: a token budget
(`ViQConfig.max_tokens_per_batch`). Two levers change the batches' shape, not the codes'
meaning:

- `bucket`: batches of images with the same token count (sorted by size first), so that every
  segment of a packed batch has one length: attention is then a plain batched SDPA call with no
  mask at all (`uniform_attention`), instead of a block-diagonal mask over the whole pack;
- `uniform_dense`: take that mask-free path whenever a batch's segments are equal.

Both compute the same attention; the codes can differ from the masked path only where float
rounding moves a value across an FSQ level boundary (rare; measured by
`scripts/bench_viq.py --levers`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def plan_batches(token_counts: list[int], budget: int, bucket: bool = False) -> list[list[int]]:
    """Indices of the images in each batch: consecutive images until the next would pass `budget`
    tokens (an image over the budget goes alone). `bucket`: images sorted by token count first
    (stable), so most batches hold one size."""
    order = sorted(range(len(token_counts)), key=lambda i: token_counts[i]) if bucket else range(len(token_counts))
    batches, current, size = [], [], 0
    for i in order:
        n = token_counts[i]
        if current and size + n > budget:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches


def uniform_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """Attention within consecutive segments of one `length`: q, k, v [T, heads, D] -> [T, heads, D],
    as one batched SDPA call without a mask (T = segments x length)."""
    t, h, d = q.shape
    q, k, v = (x.reshape(t // length, length, h, d).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(t, h, d)
