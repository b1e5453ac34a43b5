"""What the hardware can do and when it is done: peak FLOP/s for MFU, device syncs for timing.

Shared by the trainer (MFU in metrics.jsonl) and the benchmarks (`mllm/bench/`).
"""
from __future__ import annotations

import gc

import torch

# Peak dense bf16 tensor throughput (FLOP/s) of known GPUs: the denominator of MFU.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of `device`, or None (CPU, or a GPU not in GPU_PEAK_BF16: no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16.items():
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing boundaries); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def free_memory() -> None:
    """Drop unreachable objects and return cached GPU blocks (between benchmark arms)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
