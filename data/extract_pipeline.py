"""Code extraction that keeps the encoder busy: decode workers, overlapped copies, a writer
thread, and ranks that split the work and merge the result by themselves.

    summary = extract_pipeline(viq_model, "viq-1.3b", records, "codes/", key_root=root, workers=8)

Per rank, three things run at once:

1. `workers` DataLoader processes read, decode and resize images (PIL, CPU-bound) into uint8
   tensors, a quarter of the bytes of the normalised float input; batches are pinned in
   page-locked memory on CUDA so the host-to-device copy is asynchronous;
2. the main thread copies a batch to the device, normalises it there and runs the encoder; the
   codes come back through a pinned buffer with a CUDA event, so the next batch is launched
   before the previous one's codes have arrived;
3. a writer thread waits for those codes and appends them to this rank's shards (checksums,
   file writes, fsync at shard ends), off the encoder's critical path.

Ranks: under `torchrun` or `deepspeed --num_gpus N` (RANK / WORLD_SIZE / MASTER_ADDR set), each
rank takes every WORLD_SIZE-th image, writes its own shards, and after a barrier rank 0 builds
the one manifest and verifies every shard. Resumable: images already in a complete shard of any
rank are skipped; a killed run's unfinished shard is never listed and is removed by the next
writer of that rank. Undecodable images are skipped, counted and listed in
`skipped-rank<r>.jsonl` (or, with on_error="fail", stop the run with the one-line error).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import torch

from data.extract import SKIPPED_SHOWN, cache_meta, image_key, unique_images
from data.shards import ShardWriter, done_keys, merge_manifests, verify
from data.video import VideoSettings
from data.video_codes import extract_videos
from viq.encode_batching import plan_batches
from viq.errors import ConfigError
from viq.image import ImageInputError, load_resized, normalize

_STOP = object()
logger = logging.getLogger(__name__)


class DecodeSet(torch.utils.data.Dataset):
    """(key, uint8 [3, H, W] or None, error or None) per image: runs in the decode workers."""

    def __init__(self, items, policy):
        self.items, self.policy = items, policy

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, ref = self.items[i]
        try:
            return key, load_resized(ref, self.policy, key), None
        except ImageInputError as e:
            return key, None, str(e)


def _as_list(batch):
    return batch


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else from a launcher's environment
    (torchrun / the deepspeed launcher set RANK, WORLD_SIZE, MASTER_ADDR), in which case a gloo
    group is started for the barrier and the merge; (0, 1) when run alone."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "MASTER_ADDR" in os.environ:
        # A rank may finish hours after another on a skewed data set: the barrier waits that long.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), world


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class _Writer(threading.Thread):
    """Appends finished batches' codes to the rank's shards; the first error is kept and re-raised
    by the main thread (a bug still shows its traceback)."""

    def __init__(self, writer: ShardWriter, bytes_per_code: int, commit_seconds: float):
        super().__init__(daemon=True, name="code-shard-writer")
        self.writer, self.bytes_per_code = writer, bytes_per_code
        self.commit_seconds, self.last_commit = commit_seconds, time.monotonic()
        self.queue: queue.Queue = queue.Queue(maxsize=4)  # back-pressure: at most 4 batches of codes in flight
        self.error: BaseException | None = None
        self.n_images = self.n_tokens = self.code_bytes = 0

    def run(self):
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # drain: the main thread stops at its next put
            try:
                keys, grids, codes, ready = item
                if ready is not None:
                    ready.synchronize()
                for key, (h, w), c in zip(keys, grids, codes.split([h * w for h, w in grids])):
                    self.writer.add(key, c.reshape(h, w, 4))
                    self.n_images += 1
                    self.n_tokens += h * w
                    self.code_bytes += h * w * 4 * self.bytes_per_code
                if time.monotonic() - self.last_commit >= self.commit_seconds:  # a kill loses at most this much
                    self.writer.commit()
                    self.last_commit = time.monotonic()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)


def _encode_async(model, pixels: list[torch.Tensor], keys: list[str], bucket: bool, writer: _Writer) -> None:
    """Encode one decoded batch in token-budget sub-batches and hand each one's codes to the writer
    without waiting for them: on CUDA through a pinned buffer and an event."""
    cfg = model.config
    counts = [p.shape[1] * p.shape[2] // cfg.patch_size**2 for p in pixels]
    cuda = model.device.type == "cuda"
    for batch in plan_batches(counts, cfg.max_tokens_per_batch, bucket):
        res = model([pixels[i] for i in batch])
        indices = res["indices"].to(torch.int32)
        ready = None
        if cuda:
            host = torch.empty(indices.shape, dtype=torch.int32, pin_memory=True)
            host.copy_(indices, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = indices
        writer.put(([keys[i] for i in batch], res["grids"], host, ready))


def extract_pipeline(
    viq_model, viq_name: str, records, out_dir: str, *, key_root: str | None, workers: int = 4,
    batch_images: int = 32, bucket: bool = False, on_error: str = "skip", shard_bytes: int | None = None,
    verify_shards: bool = True, rank: int | None = None, world_size: int | None = None, log=print,
    video: VideoSettings | None = None, commit_seconds: float = 30.0,
) -> dict:
    """Encode every image of `records` not yet in `out_dir` (this rank's share); returns the
    summary (on rank 0 of a multi-rank run: every rank's counts summed, the manifest built and
    verified). `rank` / `world_size` by hand (no process group): this rank's share only, and
    merge_manifests once every rank is done; by default they come from the launcher."""
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    if workers < 0 or batch_images < 1:
        raise ConfigError(f"--workers must be >= 0 and --batch-images >= 1, got {workers} and {batch_images}")
    rank, world = (rank, world_size) if rank is not None and world_size is not None else distributed_rank()
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside [0, {world}) (--rank / --world-size)")
    images = unique_images(records, key_root)
    mine = images[rank::world]
    done = done_keys(out_dir)
    todo = [(k, ref) for k, ref in mine if k not in done]
    cuda = viq_model.device.type == "cuda"
    if cuda:  # events, pinned copies and the loader's pin thread all use the current device: this rank's GPU
        torch.cuda.set_device(viq_model.device)
    # Batches are cut from the rank's full image list and cached images filtered out of them: a
    # resumed run encodes exactly the batches an uninterrupted run would have (the same bytes).
    position = {k: n for n, (k, _) in enumerate(todo)}
    batches = [[position[k] for k, _ in mine[i : i + batch_images] if k in position] for i in range(0, len(mine), batch_images)]
    loader = torch.utils.data.DataLoader(
        DecodeSet(todo, viq_model.config.resize_policy), batch_sampler=[b for b in batches if b], num_workers=workers,
        collate_fn=_as_list, pin_memory=cuda, prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    skipped_path = Path(out_dir) / f"skipped-rank{rank:03d}.jsonl"
    skipped_path.unlink(missing_ok=True)  # skipped images are retried: the report is this run's
    writer_kw = {"shard_bytes": shard_bytes} if shard_bytes else {}
    bytes_per_code = 2 if viq_model.codebook_size <= 2**16 else 4
    n_skipped, raw_bytes, wait_s = 0, 0, 0.0
    t0 = time.perf_counter()
    with ShardWriter(out_dir, rank=rank, meta=cache_meta(viq_model.config, viq_name), **writer_kw) as shards:
        writer = _Writer(shards, bytes_per_code, commit_seconds)
        writer.start()
        try:
            with torch.inference_mode():
                batches = iter(loader)
                for b in range(len(loader)):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    wait_s += time.perf_counter() - t_wait  # the encoder idles here: decode is the bottleneck
                    pixels, keys = [], []
                    for key, image, error in batch:
                        if image is None:
                            if on_error == "fail":
                                raise ImageInputError(error)
                            n_skipped += 1
                            if n_skipped <= SKIPPED_SHOWN:
                                logger.warning(f"skipped {key}: {error}")
                            with open(skipped_path, "a") as fh:
                                fh.write(json.dumps({"key": key, "error": error}) + "\n")
                            continue
                        raw_bytes += image.numel()
                        pixels.append(normalize(image.to(viq_model.device, non_blocking=True), viq_model.config.resize_policy))
                        keys.append(key)
                    if pixels:
                        _encode_async(viq_model, pixels, keys, bucket, writer)
                    if log and b % 20 == 0:
                        n = min((b + 1) * batch_images, len(todo))
                        log(f"rank {rank}: {n}/{len(todo)} images decoded, {n / (time.perf_counter() - t0):.1f} images/s")
        finally:
            writer.queue.put(_STOP)  # the writer drains what is queued, then stops
            writer.join()
        if writer.error is not None:
            raise writer.error
        image_seconds = time.perf_counter() - t0
        # videos frame by frame into the same shards (data/video_codes.py), this rank's share
        videos = extract_videos(viq_model, records, key_root, shards, video or VideoSettings(), video_key=image_key,
                                rank=rank, world_size=world, on_error=on_error, skipped_path=skipped_path)
    local = {"images_total": len(mine), "images_already_cached": len(mine) - len(todo),
             "images_encoded": writer.n_images, "images_skipped": n_skipped, "tokens": writer.n_tokens,
             "raw_bytes": raw_bytes, "code_bytes": writer.code_bytes, "seconds": image_seconds, "decode_wait_s": wait_s,
             **videos}
    skipped = n_skipped or videos["videos_skipped"]
    if n_skipped:
        shown = f" (the first {SKIPPED_SHOWN} named above)" if n_skipped > SKIPPED_SHOWN else ""
        logger.warning(f"{n_skipped} image(s) skipped{shown}; every one with its error: {skipped_path}")
    return _finish(local, out_dir, rank, world, skipped_path if skipped else None, verify_shards)


def _finish(local: dict, out_dir: str, rank: int, world: int, skipped_path, verify_shards: bool) -> dict:
    """After every rank has closed its shards: rank 0 merges and verifies; counts are summed."""
    parts = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)  # also the barrier: every rank's shards are closed
    elif world > 1:
        # --rank/--world-size by hand: the other ranks may still be writing; `--merge` once they are done
        return {**local, "rank": rank, "world_size": world, "merged": False, **_rates(local)}
    summary = {k: sum(p[k] for p in parts) for k in local}
    for key in ("seconds", "video_seconds"):  # the ranks run side by side
        summary[key] = max(p[key] for p in parts)
    summary.update(rank=rank, world_size=world, per_rank_images_per_s=[_rates(p)["images_per_s"] for p in parts],
                   merged=True)  # rank 0 merges below; the others wait for it at the barrier
    if rank == 0:
        t0 = time.perf_counter()
        manifest = merge_manifests(out_dir)
        report = verify(out_dir) if verify_shards else None
        summary.update(shards=len(manifest["shards"]), records_in_cache=manifest["n_records"],
                       verify_seconds=time.perf_counter() - t0)
        if report is not None:
            summary.update(verified=report["ok"], verify_errors=report["errors"][:20])
    _barrier()  # nobody leaves before the manifest exists
    if skipped_path is not None:
        summary["skipped_report"] = str(skipped_path)
    return {**summary, **_rates(summary)}


def _rates(counts: dict) -> dict:
    seconds = counts["seconds"]
    return {"images_per_s": counts["images_encoded"] / seconds if seconds > 0 else 0.0,
            "compression_ratio": counts["raw_bytes"] / counts["code_bytes"] if counts["code_bytes"] else None}
