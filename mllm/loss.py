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

    The weight must be whole: under ZeRO-3 call it inside the forward of the module that owns the
    weight (LinearHead, SplitHead). Without autograd (eval) it only computes the loss.
    """
    if weight.numel() == 0:  # a ZeRO-3 shard read outside its module's forward
        raise ValueError("fused_linear_cross_entropy got an empty weight (a ZeRO-3 shard): call it inside the forward of "
                         "the module that owns the weight (mllm.loss.LinearHead)")
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    if targets.shape[0] == 0:  # still touch the weight so every rank uses the same parameters
        return (F.linear(hidden[:0], weight).float().sum() * 0.0) if (need_h or need_w) else hidden.new_zeros((), dtype=torch.float32)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, need_h, need_w)


class LinearHead(torch.nn.Module):
    """A bias-free output head, `logits = hidden @ weight.T`, whose forward also computes the fused loss.

    `head(hidden)` gives logits (generation, evaluation); `head(hidden, targets=t, chunk_size=c)`
    gives `fused_linear_cross_entropy`. The loss runs inside the head's own forward because that
    is where ZeRO-3 gathers a module's weight: for the forward, and again before the backward, so
    that the gradient computed in the forward is accumulated into the whole parameter and reduced
    by ZeRO-3's hooks. A loss that read `lm_head.weight` from outside would see an empty shard.
    The weight is the given Parameter itself (a tied model's embedding), never a copy.
    """

    fused_loss = True  # its forward takes targets

    def __init__(self, weight: torch.nn.Parameter, shape: tuple[int, int]):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = shape  # also while the weight is a ZeRO-3 shard

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, chunk_size: int = 0) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight)
        return fused_linear_cross_entropy(hidden, self.weight, targets, chunk_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def use_fused_loss_head(llm) -> None:
    """Make the output head of `llm` one that computes the fused loss in its forward (LinearHead).

    A head that already does (LinearHead, a split head) stays; an nn.Linear is replaced by a
    LinearHead on the same Parameter, so weights, tying and the saved state dict are unchanged.
    """
    head = llm.get_output_embeddings()
    if getattr(head, "fused_loss", False):
        return
    if getattr(head, "bias", None) is not None or not isinstance(head, torch.nn.Linear):
        raise ValueError("model.loss_impl=fused supports bias-free linear output heads only (Qwen2.5's); use loss_impl=chunked")
    llm.set_output_embeddings(LinearHead(head.weight, (head.out_features, head.in_features)))
