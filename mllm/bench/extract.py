"""Extraction throughput: JPEG decode per worker, encode alone, and JPEG files to verified shards.

Behind scripts/bench_extract.py. The target of docs/benchmarks.md: end-to-end images/s at least
90% of encode-only images/s on the GPU (decode workers and the shard writer keep up); on a CPU
the decode rate per worker tells a user how many workers one GPU needs.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.conversations import load_records
from data.extract_pipeline import DecodeSet, extract_pipeline
from mllm.hardware import device_name, sync
from viq.model import ViQModel


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (480, 640), seed: int = 0) -> Path:
    """n photo-like JPEGs (smooth gradients + noise, quality 90: real decode work) and a JSONL naming them."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    lines = []
    for i in range(n):
        base = np.stack([(xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:05d}.jpg", quality=90)
        lines.append(f'{{"id": "{i}", "image": "images/{i:05d}.jpg", "conversations": '
                     '[{"from": "human", "value": "<image>\\nDescribe."}, {"from": "gpt", "value": "ok"}]}')
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def decode_rate(items, policy, workers: int, batch: int = 16) -> float:
    """Images/s of read + decode + resize through the pipeline's own DataLoader set-up."""
    loader = torch.utils.data.DataLoader(DecodeSet(items, policy), batch_size=batch, num_workers=workers,
                                         collate_fn=lambda b: b, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t0)


def run_extract_benchmark(preset: str, n_images: int = 64, workers: list[int] | None = None, device=None,
                          dtype=None, size=(480, 640), extract_workers: int | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = torch.bfloat16 if (dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else torch.float32
    workers = workers or [0, 1, 2]
    model = ViQModel.from_pretrained(preset, device=device, dtype=torch_dtype)
    result = {"preset": preset, "device": device_name(device), "dtype": str(torch_dtype).replace("torch.", ""),
              "images": n_images, "jpeg_size": list(size), "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}  # a shared box: say how busy it was
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        train = write_jpegs(Path(tmp), n_images, size)
        records = load_records(train, train.parent)
        items = [(f"images/{i:05d}.jpg", r.images[0]) for i, r in enumerate(records)]
        policy = model.config.resize_policy
        decode_rate(items[:8], policy, 0)  # file cache warm for every measurement
        result["decode"] = {}
        for w in workers:
            rate = decode_rate(items, policy, w)
            result["decode"][f"workers_{w}"] = {"images_per_s": rate, "images_per_s_per_worker": rate / max(w, 1)}
        pixels = [p.to(device) for p in model.preprocess([r.images[0] for r in records])]
        model.encode_pixels(pixels[:8])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.encode_pixels(pixels)
        sync(device)
        encode = n_images / (time.perf_counter() - t0)
        result["encode_only_images_per_s"] = encode
        w = extract_workers if extract_workers is not None else max(workers)
        summary = extract_pipeline(model, preset, records, str(Path(tmp) / "codes"), key_root=str(train.parent),
                                   workers=w, log=None)
        result["end_to_end"] = {"workers": w, "images_per_s": summary["images_per_s"], "verified": summary["verified"],
                                "decode_wait_s": summary["decode_wait_s"], "seconds": summary["seconds"],
                                "fraction_of_encode_only": summary["images_per_s"] / encode}
    result["load_average_after"] = os.getloadavg()[0]
    return result
