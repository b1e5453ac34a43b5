"""Attention backend choice for packed training.

Packed rows hold several samples whose `position_ids` restart at 0. With `attention_mask=None`
and no KV cache, transformers (5.x, `masking_utils.find_packed_sequence_indices`) turns the
restarts into a document mask for sdpa / eager / flex_attention, so samples never attend to each
other. flash_attention_2 only detects packing for a single row; `ViQMLLM` therefore flattens the
batch to one row and hands flash-attn the `cu_seqlens` directly (no per-layer detection).
No dense mask is ever built on the host: sdpa / eager build theirs on the device.
"""
from __future__ import annotations

import importlib.util

import torch


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _is_cuda(device: str | torch.device | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _check_sdpa(device) -> None:
    return None


def _check_eager(device) -> None:
    return None


def _check_flex(device) -> None:
    if not _is_cuda(device):
        raise ValueError("attention 'flex_attention' needs CUDA (FlexAttention has no CPU backward); use 'sdpa' on CPU")


def _check_flash(device) -> None:
    if not _flash_attn_installed():
        raise ValueError("attention 'flash_attention_2' needs the flash-attn package; install it or use 'flex_attention'")
    if not _is_cuda(device):
        raise ValueError("attention 'flash_attention_2' needs CUDA; use 'sdpa' on CPU")


# name -> check that raises a one-line reason when the backend cannot run on the device.
ATTENTION_BACKENDS = {
    "sdpa": _check_sdpa,
    "eager": _check_eager,
    "flex_attention": _check_flex,
    "flash_attention_2": _check_flash,
}


def resolve_attn_implementation(requested: str = "auto", device: str | torch.device | None = None) -> str:
    """'auto' -> flash_attention_2 (flash-attn + CUDA), else flex_attention (CUDA), else sdpa (CPU).

    An explicit name is checked against the device and fails loudly when it cannot run there.
    """
    if requested == "auto":
        if _is_cuda(device):
            return "flash_attention_2" if _flash_attn_installed() else "flex_attention"
        return "sdpa"
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention {requested!r}; valid: {['auto', *ATTENTION_BACKENDS]}")
    ATTENTION_BACKENDS[requested](device)
    return requested
