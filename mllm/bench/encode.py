"""Encode throughput and code storage of a ViQ tokenizer: behind scripts/bench_viq.py and the online arm."""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

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


# ---- encode levers (scripts/bench_viq.py --levers) -------------------------------------------
ENCODE_CASES = {
    # name: (image sizes for n images, rng) -> list of (h, w)
    "448x448": lambda n, rng: [(448, 448)] * n,
    "mixed_native": lambda n, rng: [tuple(int(v) for v in rng.integers(112, 897, 2)) for _ in range(n)],
    # the paper's reconstruction setting: 256 px images as 16 x 16 tokens (resized to 448 px)
    "256px_16x16": lambda n, rng: [(256, 256)] * n,
}


def encode_lever_settings(device: torch.device) -> dict[str, dict]:
    """name -> settings, each one lever away from the baseline (the extraction defaults)."""
    levers = {
        "baseline": {},
        "bucketed": {"bucket": True},
        "bucketed_dense": {"bucket": True, "uniform_dense": True},
        "tokens_per_batch_x2": {"tokens_scale": 2.0},
        "tokens_per_batch_x4": {"tokens_scale": 4.0},
    }
    if device.type == "cuda":  # FlexAttention and compiled blocks: no CPU path worth timing
        levers.update({
            "sdpa_masked": {"backend": "sdpa"},
            "flex": {"backend": "flex"},
            "compiled_blocks": {"compile_blocks": True},
            "bucketed_dense_compiled": {"bucket": True, "uniform_dense": True, "compile_blocks": True},
        })
    return levers


def apply_encode_levers(model: ViQModel, backend: str | None = None, uniform_dense: bool = False,
                        compile_blocks: bool = False) -> None:
    """Attention backend of every ViT block, the mask-free path for equal segments, torch.compile per block."""
    for block in model.vit.blocks:
        if backend is not None:
            block.attn.backend = backend
        block.attn.uniform_dense = uniform_dense
        if compile_blocks:
            block.compile(dynamic=True)


def _case_images(sizes, rng) -> list[np.ndarray]:
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    if sizes and sizes[0] == (256, 256):  # 16 x 16 tokens: resized to 448 px, as the reconstruction protocol does
        images = [np.asarray(Image.fromarray(a).resize((448, 448), Image.BICUBIC)) for a in images]
    return images


def run_encode_levers(preset: str, device=None, dtype=None, n_images: int = 16, repeats: int = 3,
                      levers: list[str] | None = None, cases: list[str] | None = None, on_result=None) -> dict:
    """Images/s, tokens/s and MFU of each encode lever on each case, plus the quantiser's share of
    the baseline's time; a fresh model per lever (compilation and attributes do not leak).
    `on_result(result)` after each measurement, so a cut-off run keeps its numbers."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    available = encode_lever_settings(device)
    levers = levers or list(available)
    unknown = [name for name in levers if name not in available]
    if unknown:
        raise ValueError(f"unknown encode lever(s) {unknown}; valid on {device.type}: {', '.join(available)}")
    peak = gpu_peak_flops(device)
    result = {"preset": preset, "device": device_name(device), "dtype": dtype, "images": n_images, "repeats": repeats,
              "torch": torch.__version__, "cases": {}}
    for case in cases or list(ENCODE_CASES):
        rng = np.random.default_rng(0)
        images = _case_images(ENCODE_CASES[case](n_images, rng), rng)  # the same images for every lever
        out = result["cases"].setdefault(case, {})
        for name in levers:
            settings = available[name]
            model = ViQModel.from_pretrained(preset, device=device, dtype=torch_dtype)
            model.config.max_tokens_per_batch = int(model.config.max_tokens_per_batch * settings.get("tokens_scale", 1.0))
            apply_encode_levers(model, settings.get("backend"), settings.get("uniform_dense", False),
                                settings.get("compile_blocks", False))
            pixels = [p.to(device) for p in model.preprocess(images)]
            try:
                seconds, codes = _measure_with(model, pixels, repeats, settings.get("bucket", False))
            except Exception as e:  # noqa: BLE001 - one lever's failure (a compiler error, OOM) is reported, not fatal
                out[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]}
                continue
            grids = [tuple(c.shape[:2]) for c in codes]
            entry = {"images_per_s": len(pixels) / seconds, "tokens_per_s": sum(h * w for h, w in grids) / seconds,
                     "ms_per_batch_of_images": seconds * 1e3, "settings": settings}
            if peak:
                entry["mfu"] = encode_flops(model, grids) / seconds / peak
            if name == "baseline":
                entry["quantizer_share"] = _quantizer_share(model, pixels, repeats)
                out["_reference_codes"] = codes
            else:
                ref = out.get("_reference_codes")
                if ref is not None:  # how many codes the lever's float rounding moved (0 on CPU fp32 expected)
                    entry["codes_differing"] = float(sum(int((a != b).sum()) for a, b in zip(ref, codes))
                                                     / sum(a.numel() for a in ref))
            out[name] = entry
            del model
            if on_result is not None:
                on_result(_public(result))
    return _public(result)


def _public(result: dict) -> dict:
    return {**result, "cases": {c: {k: v for k, v in levers.items() if not k.startswith("_")}
                                for c, levers in result["cases"].items()}}


def _measure_with(model, pixels, repeats, bucket: bool):
    device = model.device
    model.encode_pixels(pixels, bucket=bucket)  # warm-up (compilation, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        codes = model.encode_pixels(pixels, bucket=bucket)
    sync(device)
    return (time.perf_counter() - t0) / repeats, codes


@torch.no_grad()
def _quantizer_share(model: ViQModel, pixels, repeats: int) -> float:
    """Fraction of the forward spent in the quantiser (after the ViT and its 2x2 merge), from
    ViT-only vs full timings."""
    device = model.device
    times = {}
    for name, fn in (("vit", lambda: model.vit(pixels)), ("full", lambda: model(pixels))):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        times[name] = time.perf_counter() - t0
    return max(0.0, 1.0 - times["vit"] / times["full"])
