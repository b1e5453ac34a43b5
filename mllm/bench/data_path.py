"""Data-path benchmark: packing efficiency, packed-loader throughput from cached codes, shard I/O.

Behind `python scripts/bench_data.py`. Everything is synthetic and offline.

Length mix (modelled on LLaVA-OneVision's SFT data; lengths in LLM positions, an image of
h x w ViQ tokens taking 2 + h * (w + 1) positions):
  60% single image, 256-1400 image positions, text (prompt + answer) log-normal with
      median 120 tokens, clipped to [8, 3000]
  10% high-resolution document, 1400-3000 image positions, same text
  10% multi-image, 2-6 images of 196-729 positions each, same text
  20% text only, log-normal median 500 tokens, clipped to [16, 12000] (a few exceed 4k)
Targets: packing efficiency >= 98% at 4096 and >= 99.5% at 16384; loader >= 200k tokens/s
per CPU core (measured on one thread).
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import torch

from data.loader import PackedLoader
from data.packing import IGNORE_INDEX, plan_packs
from data.shards import CodeStore, ShardWriter, compression_ratio, merge_manifests
from data.tokenizer import PRESET_EMBEDDING_ROWS, QWEN25_TEXT_VOCAB_SIZE
from data.vocab import CodeVocab
from viq.model import get_preset

# The paper-scale set-up: viq-1.3b's FSQ levels laid out against Qwen2.5-1.5B's vocabulary.
LEVELS = list(get_preset("viq-1.3b").levels)
CODEBOOK_SIZE = math.prod(LEVELS)
VOCAB = CodeVocab(text_vocab_size=QWEN25_TEXT_VOCAB_SIZE, embedding_rows=PRESET_EMBEDDING_ROWS["qwen2.5-1.5b"],
                  codebook_size=CODEBOOK_SIZE)


def random_grid(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    """A token grid whose image span has between lo and hi positions, aspect ratio 1:2 to 2:1."""
    while True:
        target = rng.integers(lo, hi + 1)
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        h = max(1, int(round(np.sqrt(target / aspect))))
        w = max(1, int(round((target - 2) / h)) - 1)
        if lo <= VOCAB.image_length(h, w) <= hi:
            return h, w


def text_length(rng: np.random.Generator, median: float, lo: int, hi: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), 1.0), lo, hi))


def mix_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=n, p=[0.6, 0.1, 0.1, 0.2])
    out = np.empty(n, dtype=np.int64)
    for i, kind in enumerate(kinds):
        if kind == 3:
            out[i] = text_length(rng, 500, 16, 12000)
            continue
        text = text_length(rng, 120, 8, 3000)
        if kind == 0:
            image = VOCAB.image_length(*random_grid(rng, 256, 1400))
        elif kind == 1:
            image = VOCAB.image_length(*random_grid(rng, 1400, 3000))
        else:
            image = sum(VOCAB.image_length(*random_grid(rng, 196, 729)) for _ in range(rng.integers(2, 7)))
        out[i] = image + text
    return out


class LengthsOnly:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def length(self, i):
        return int(self.lengths[i])

    def __getitem__(self, i):
        raise NotImplementedError("packing-only benchmark")


def bench_packing(lengths: np.ndarray, capacity: int, buffer_size: int) -> dict:
    t0 = time.perf_counter()
    _, loader_stats = PackedLoader(LengthsOnly(lengths), capacity, buffer_size=buffer_size).plan_epoch()
    seconds = time.perf_counter() - t0
    _, no_refill = PackedLoader(LengthsOnly(lengths), capacity, buffer_size=buffer_size, refill_below=0.0).plan_epoch()
    _, whole = plan_packs(lengths.tolist(), capacity)
    return {
        "capacity": capacity,
        "buffer_size": buffer_size,
        "efficiency": loader_stats.efficiency,
        "efficiency_without_refill": no_refill.efficiency,
        "efficiency_whole_dataset_bfd": whole.efficiency,
        "n_samples": loader_stats.n_samples,
        "n_packs": loader_stats.n_packs,
        "n_truncated": loader_stats.n_truncated,
        "plan_seconds": seconds,
    }


class CachedCodesDataset:
    """Conversation-shaped samples around cached codes: prompt, one image span, answer."""

    def __init__(self, store: CodeStore, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.store = store
        self.keys = sorted(store.keys())
        self.prompt_len = [text_length(rng, 40, 4, 400) for _ in self.keys]
        self.answer_len = [text_length(rng, 80, 4, 2000) for _ in self.keys]
        self.lengths = [
            p + VOCAB.image_length(*store.grid(k)) + a for k, p, a in zip(self.keys, self.prompt_len, self.answer_len)
        ]

    def __len__(self):
        return len(self.keys)

    def length(self, i):
        return self.lengths[i]

    def __getitem__(self, i):
        codes = self.store.get(self.keys[i])
        h, w, _ = codes.shape
        span = torch.full((h, w + 1), VOCAB.image_pad_id, dtype=torch.long)
        span[:, w] = VOCAB.row_end_id
        prompt = torch.arange(self.prompt_len[i], dtype=torch.long) + 1000
        answer = torch.arange(self.answer_len[i], dtype=torch.long) + 2000
        start, end = torch.tensor([VOCAB.vision_start_id]), torch.tensor([VOCAB.vision_end_id])
        ids = torch.cat([prompt, start, span.flatten(), end, answer])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-len(answer) :] = answer
        return {"input_ids": ids, "labels": labels, "codes": codes.reshape(-1, 4)}


def bench_shards_and_loader(n_images: int, capacity: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    grids = [random_grid(rng, 256, 1400) for _ in range(n_images)]
    codes = [rng.integers(0, CODEBOOK_SIZE, size=(h, w, 4), dtype=np.int64) for h, w in grids]
    meta = {"levels": LEVELS, "codebook_size": CODEBOOK_SIZE, "tokenizer": "bench-random"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with ShardWriter(tmp, shard_bytes=4 << 20, meta=meta) as writer:
            for i, c in enumerate(codes):
                writer.add(f"images/{i:06d}.jpg", c)
        merge_manifests(tmp)
        write_s = time.perf_counter() - t0
        nbytes = sum(os.path.getsize(os.path.join(tmp, n)) for n in writer.shards_written)

        store = CodeStore(tmp, expected_meta=meta)
        order = rng.permutation(n_images)
        t0 = time.perf_counter()
        for i in order:
            store.get(f"images/{i:06d}.jpg")
        read_s = time.perf_counter() - t0

        dataset = CachedCodesDataset(store, seed)
        loader = PackedLoader(dataset, capacity, buffer_size=512, seed=seed)
        n_batches = n_tokens = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for batch in loader:
            n_batches += 1
            n_tokens += batch["n_real_tokens"]
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        ratios = [compression_ratio(h, w, h * w * 4 * 2) for h, w in grids]
        return {
            "shards": {
                "n_images": n_images,
                "n_shards": len(writer.shards_written),
                "code_bytes": nbytes,
                "write_MB_per_s": nbytes / write_s / 1e6,
                "write_images_per_s": n_images / write_s,
                "random_read_MB_per_s": nbytes / read_s / 1e6,
                "random_read_images_per_s": n_images / read_s,
                "mean_compression_ratio": float(np.mean(ratios)),
            },
            "loader": {
                "capacity": capacity,
                "n_batches": n_batches,
                "real_tokens": n_tokens,
                "packing_efficiency": loader.stats.efficiency,
                "tokens_per_s_wall": n_tokens / wall,
                "tokens_per_s_per_core": n_tokens / cpu,
                "torch_threads": torch.get_num_threads(),
            },
        }


def run_data_benchmark(n_samples: int = 50_000, n_images: int = 3000, buffer_size: int = 2048, seed: int = 0) -> dict:
    """The whole report of scripts/bench_data.py (torch on one thread: per-core figures)."""
    torch.set_num_threads(1)
    lengths = mix_lengths(n_samples, seed)
    report = {
        "mix": {
            "n_samples": len(lengths),
            "mean_length": float(lengths.mean()),
            "p50_length": float(np.median(lengths)),
            "p99_length": float(np.percentile(lengths, 99)),
        },
        "packing": {str(c): bench_packing(lengths, c, buffer_size) for c in (4096, 16384)},
        **bench_shards_and_loader(n_images, 4096, seed),
    }
    report["targets_met"] = {
        "packing_4096_ge_0.98": report["packing"]["4096"]["efficiency"] >= 0.98,
        "packing_16384_ge_0.995": report["packing"]["16384"]["efficiency"] >= 0.995,
        "loader_ge_200k_tokens_per_s_per_core": report["loader"]["tokens_per_s_per_core"] >= 200_000,
    }
    return report
