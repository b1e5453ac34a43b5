"""Cross-entropy over the extended vocabulary without full-sequence fp32 logits.

The head of a Qwen2.5 model with the code vocabulary has ~216k rows: fp32 logits for a 16k
pack would be 14 GB. Two implementations keep one chunk of logits alive at a time:

- `chunked_linear_cross_entropy`: logits chunk by chunk, each chunk under activation
  checkpointing (backward recomputes the chunk's logits: 4 head matmuls per token);
- `fused_linear_cross_entropy`: forward computes each chunk's loss *and* its gradients with
  respect to the hidden states and the head weight at once (softmax - one-hot), so backward
  only scales the stored gradients by the incoming scalar: 3 head matmuls per token, no
  recomputation, and the weight gradient accumulates in fp32.

Both return the fp32 sum of token losses; with the same inputs they agree to fp32 rounding.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_IMPLEMENTATIONS = ("chunked", "fused")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, chunk_size: int,
    recompute: bool = True,
) -> torch.Tensor:
    """sum_i CE(head(hidden[i]), targets[i]) in fp32; hidden [N, H], targets [N].

    `head` is the output module itself (called, so that ZeRO-3 gathers its weight). At least one
    chunk runs (on zero rows when N == 0) so that every rank of a ZeRO-3 job runs the same modules.
    """

    def chunk_ce(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    n = targets.shape[0]
    chunk = chunk_size if chunk_size > 0 else max(n, 1)
    recompute = recompute and torch.is_grad_enabled() and hidden.requires_grad
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(n, 1), chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        part = checkpoint(chunk_ce, h, y, use_reentrant=False) if recompute else chunk_ce(h, y)
        total = total + part
    return total


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, need_hidden_grad: bool, need_weight_grad: bool):
        n = targets.shape[0]
        chunk = chunk_size if chunk_size > 0 else max(n, 1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, n, chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum CE)/d(logits) = softmax - one_hot, computed in place over the fp32 chunk.
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs.scatter_add_(1, y.unsqueeze(1), probs.new_full((y.shape[0], 1), -1.0))
            g = probs.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = g @ weight
            if grad_weight is not None:
                grad_weight.add_(g.t() @ h)  # each chunk's product in the weight's dtype, summed in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_size: int) -> torch.Tensor:
    """Same value as `chunked_linear_cross_entropy`; the gradients are computed in the forward pass.

    The weight must be whole on this rank (not a ZeRO-3 partition). Without autograd (eval) it
    only computes the loss.
    """
    if weight.numel() == 0:  # a ZeRO-3 partition outside its module's forward
        raise ValueError("model.loss_impl=fused needs the whole head weight on each rank (ZeRO stage <= 2); use loss_impl=chunked")
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    if targets.shape[0] == 0:  # still touch the weight so every rank uses the same parameters
        return (F.linear(hidden[:0], weight).float().sum() * 0.0) if (need_h or need_w) else hidden.new_zeros((), dtype=torch.float32)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, need_h, need_w)


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The [V, H] matrix of a bias-free head: nn.Linear's weight, or a split head's two tables joined."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("model.loss_impl=fused supports bias-free output heads only (Qwen2.5's); use loss_impl=chunked")
    if hasattr(head, "text_rows"):
        return torch.cat([head.text_rows, head.code_rows])
    return head.weight
