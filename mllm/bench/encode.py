"""Encode throughput and code storage of a ViQ tokenizer: behind scripts/bench_viq.py and the online arm."""
from __future__ import annotations

import time

import numpy as np
import torch

from mllm.hardware import device_name, gpu_peak_flops, sync
from viq.model import ViQModel


def encode_flops(model: ViQModel, grids: list[tuple[int, int]]) -> float:
    """Forward FLOPs: 2 * params * tokens for the matmuls plus attention scores/values."""
    cfg = model.config
    m2 = cfg.merge_size**2
    vit_params = sum(p.numel() for n, p in model.vit.named_parameters() if n.startswith("blocks"))
    total = 0.0
    for h, w in grids:
        n = h * w * m2 + 1
        total += 2 * vit_params * n + cfg.depth * 4 * n * n * cfg.width
        total += 2 * sum(p.numel() for p in model.vit.merge.parameters()) * h * w
        total += 2 * sum(p.numel() for p in model.quantizer.parameters()) * h * w * 4
    return total


def _measure(model, pixels, repeats):
    device = model.device
    model.encode_pixels(pixels)  # warm-up (compilation, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        codes = model.encode_pixels(pixels)
    sync(device)
    return (time.perf_counter() - t0) / repeats, codes


def run_encode_benchmark(preset: str, device=None, dtype=None, n_images: int = 16, repeats: int = 3) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = ViQModel.from_pretrained(preset, device=device, dtype=torch_dtype)
    rng = np.random.default_rng(0)
    cases = {
        "448x448": [(448, 448)] * n_images,
        "mixed_native": [tuple(int(v) for v in rng.integers(112, 896, 2)) for _ in range(n_images)],
    }
    peak = gpu_peak_flops(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {
        "preset": preset,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "params": sum(p.numel() for p in model.parameters()),
        "codebook_size": model.codebook_size,
    }
    for name, sizes in cases.items():
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        pixels = [p.to(device) for p in model.preprocess(images)]
        seconds, codes = _measure(model, pixels, repeats)
        grids = [tuple(c.shape[:2]) for c in codes]
        tokens = sum(h * w for h, w in grids)
        code_bytes = code_storage_bytes(model.codebook_size, tokens)
        raw_bytes = sum(h * w * 3 for h, w in sizes)
        resized_bytes = sum(h * w * (model.config.patch_size * model.config.merge_size) ** 2 * 3 for h, w in grids)
        entry = {
            "images_per_s": len(images) / seconds,
            "tokens_per_s": tokens / seconds,
            "tokens_per_image": tokens / len(images),
            "code_bytes_per_image": code_bytes / len(images),
            "raw_rgb_bytes_per_image": raw_bytes / len(images),
            "code_fraction_of_raw": code_bytes / raw_bytes,
            "code_fraction_of_resized_rgb": code_bytes / resized_bytes,
        }
        if peak:
            entry["mfu"] = encode_flops(model, grids) / seconds / peak
        result[name] = entry
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def code_storage_bytes(codebook_size: int, tokens: int) -> int:
    """Bytes of the compact shard encoding: 4 sub-codes per token, uint16 up to 65536 codes."""
    per_code = 2 if codebook_size <= 2**16 else 4
    return tokens * 4 * per_code
