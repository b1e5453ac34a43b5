"""Offline code extraction: encode every image of a data set once into code shards.

Resumable (images already in the cache are skipped; progress inside the open shard is
committed every `commit_seconds`, so a kill loses at most that much work, and the resumed
cache is byte-identical to an uninterrupted one: batches are cut from the full image list,
not from what is left), safe to run as several ranks (rank r takes every world-th image and
writes its own shards), and honest about bad images: a file that cannot be decoded is
skipped, counted, named on the console (the first few) and listed in `skipped-rank<r>.jsonl`,
unless `on_error="fail"`, which stops with the one-line error naming the file. Videos are
extracted frame by frame into the same shards (data/video_codes.py, `video` settings).
scripts/extract_codes.py runs the same steps with decode workers and a writer thread
(data/extract_pipeline.py).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from data.conversations import load_records
from data.dataset import image_key
from data.shards import ShardWriter, done_keys, merge_manifests
from data.video import VideoSettings
from data.video_codes import extract_videos
from viq.errors import ConfigError
from viq.image import ImageInputError

logger = logging.getLogger(__name__)
SKIPPED_SHOWN = 5  # skipped images named on the console; the rest are in the report file


def unique_images(records, image_root) -> list[tuple[str, object]]:
    """(key, ref) of every distinct image of the records, in first-seen order."""
    seen, out = set(), []
    for record in records:
        for k, ref in enumerate(record.images):
            key = image_key(ref, record.id, k, image_root)
            if key not in seen:
                seen.add(key)
                out.append((key, ref))
    return out


def cache_meta(viq_config, viq_name: str) -> dict:
    """What a code cache must agree on with the tokenizer reading or writing it."""
    cfg = viq_config
    return {"levels": list(cfg.levels), "codebook_size": cfg.codebook_size, "tokenizer": viq_name,
            "patch_size": cfg.patch_size, "merge_size": cfg.merge_size,
            "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}


def extract_file(viq_model, viq_name: str, data_path: str, out_dir: str, *, image_root: str | None = None, **kw) -> dict:
    """Encode the images of one conversations file (paths relative to image_root)."""
    image_root = image_root or str(Path(data_path).parent)
    return extract_codes(viq_model, viq_name, load_records(data_path, image_root), out_dir, key_root=image_root, **kw)


def extract_codes(
    viq_model, viq_name: str, records, out_dir: str, *, key_root: str | None,
    rank: int = 0, world_size: int = 1, batch_images: int = 32, on_error: str = "skip", log=logger.info,
    video: VideoSettings | None = None, commit_seconds: float = 30.0, shard_bytes: int | None = None,
) -> dict:
    """Encode the images of `records` into shards under `out_dir`, keyed relative to key_root."""
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    images = unique_images(records, key_root)[rank::world_size]
    done = done_keys(out_dir) if Path(out_dir).exists() else set()
    todo = [(k, ref) for k, ref in images if k not in done]
    skipped_path = Path(out_dir) / f"skipped-rank{rank:03d}.jsonl"
    skipped_path.unlink(missing_ok=True)  # skipped images are retried: the report is this run's
    n_skipped, n_codes_bytes, n_raw_bytes, n_tokens = 0, 0, 0, 0
    t0 = time.perf_counter()
    device = viq_model.device
    size = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    last_commit = time.monotonic()
    # Batches are cut from the rank's full image list and cached images filtered out of them:
    # a resumed run encodes exactly the batches an uninterrupted run would have (the same bytes).
    batches = [[(k, ref) for k, ref in images[i : i + batch_images] if k not in done]
               for i in range(0, len(images), batch_images)]
    batches = [b for b in batches if b]
    with ShardWriter(out_dir, rank=rank, meta=cache_meta(viq_model.config, viq_name), **size) as writer:
        n_seen = 0
        for number, chunk in enumerate(batches):
            n_seen += len(chunk)
            pixels, keys = [], []
            for key, ref in chunk:
                try:
                    pixels.append(viq_model.preprocess([ref], [key])[0].to(device))
                    keys.append(key)
                except ImageInputError as e:
                    if on_error == "fail":
                        raise
                    n_skipped += 1
                    if n_skipped <= SKIPPED_SHOWN:
                        logger.warning(f"skipped {key}: {e}")
                    with open(skipped_path, "a") as fh:
                        fh.write(json.dumps({"key": key, "error": str(e)}) + "\n")
            if not pixels:
                continue
            with torch.inference_mode():
                codes = viq_model.encode_pixels(pixels)
            for key, c, p in zip(keys, codes, pixels):
                writer.add(key, c)
                h, w = c.shape[:2]
                n_tokens += h * w
                n_raw_bytes += p.shape[1] * p.shape[2] * 3
                n_codes_bytes += c.numel() * (2 if viq_model.codebook_size <= 2**16 else 4)
            if time.monotonic() - last_commit >= commit_seconds:
                writer.commit()
                last_commit = time.monotonic()
            if log and number % 20 == 0:
                log(f"rank {rank}: {n_seen}/{len(todo)} images, {n_seen / (time.perf_counter() - t0):.1f} images/s")
        image_seconds = time.perf_counter() - t0  # images/s is for images; videos report their own time
        videos = extract_videos(viq_model, records, key_root, writer, video or VideoSettings(), video_key=image_key, rank=rank,
                                world_size=world_size, on_error=on_error, skipped_path=skipped_path)
    seconds = time.perf_counter() - t0
    if n_skipped:
        logger.warning(f"{n_skipped} image(s) skipped{f' (the first {SKIPPED_SHOWN} named above)' if n_skipped > SKIPPED_SHOWN else ''}; "
                       f"every one with its error: {skipped_path}")
    manifest = merge_manifests(out_dir) if world_size == 1 else None
    n_done = len(todo) - n_skipped
    return {
        "images_total": len(images),
        "images_already_cached": len(images) - len(todo),
        "images_encoded": n_done,
        "images_skipped": n_skipped,
        **videos,
        "skipped_report": str(skipped_path) if n_skipped or videos["videos_skipped"] else None,
        "seconds": seconds,
        "images_per_s": n_done / image_seconds if image_seconds > 0 else 0.0,
        "tokens": n_tokens,
        "compression_ratio": (n_raw_bytes / n_codes_bytes) if n_codes_bytes else None,
        "shards": len(manifest["shards"]) if manifest else None,
    }
