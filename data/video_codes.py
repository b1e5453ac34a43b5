"""Video records in the code cache and in training samples.

Extraction (`extract_videos`, called by data.extract.extract_codes with its shard writer):
every distinct video of the records (rank r takes every world-th) is planned, decoded,
resized with the per-frame budget and encoded; each frame's codes are stored under its
frame key (data.video.frame_key), so a cache holds any number of samplings side by side and
never mixes them. A video whose every frame is cached is skipped (resume); an interrupted
one is completed. An unusable video is skipped, counted and listed in the rank's skipped
report, or stops extraction with `on_error="fail"`.

Samples (`VideoFrames`): for `vision.source: codes` a video's frames, grids and timestamps
come from the cache keys alone; for `online` from the demuxed timestamps and the stream's
frame size, and the frames are decoded when the sample is read. Both give the same
sequence. `fit_frames` implements `data.overlong: truncate` for videos: trailing frames are
dropped, whole, until the sample fits.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from data.shards import done_keys
from data.video import (
    VideoIndex,
    VideoInputError,
    VideoSettings,
    expand_video_placeholder,
    frame_keys,
    frame_pixels,
    plan_frames,
    video_prefix,
)
from viq.image import token_grid


def unique_videos(records, key_root, video_key) -> list[tuple[str, object]]:
    """(key, ref) of every distinct video of the records, in first-seen order."""
    seen, out = set(), []
    for record in records:
        if record.video is not None:
            key = video_key(record.video, record.id, 0, key_root)
            if key not in seen:
                seen.add(key)
                out.append((key, record.video))
    return out


def missing_videos(codes_dir, records, key_root, video_key, settings: VideoSettings) -> int:
    """How many of the records' videos have no complete set of frames in the cache."""
    videos = unique_videos(records, key_root, video_key)
    if not videos:
        return 0
    index = VideoIndex(done_keys(codes_dir))
    return sum(index.complete(video_prefix(key, settings)) is None for key, _ in videos)


def extract_videos(viq_model, records, key_root, writer, settings: VideoSettings, *, video_key, rank: int = 0,
                   world_size: int = 1, on_error: str = "skip", skipped_path: Path | None = None) -> dict:
    """Encode the frames of the records' videos into `writer` (a data.shards.ShardWriter)."""
    videos = unique_videos(records, key_root, video_key)[rank::world_size]
    index = VideoIndex(done_keys(writer.out_dir))
    counts = {"videos_total": len(videos), "videos_already_cached": 0, "videos_encoded": 0, "videos_skipped": 0,
              "video_frames_encoded": 0, "video_tokens": 0}
    policy = viq_model.config.resize_policy
    t0 = time.perf_counter()
    for key, ref in videos:
        if index.complete(video_prefix(key, settings)) is not None:
            counts["videos_already_cached"] += 1
            continue
        try:
            plan = plan_frames(ref, settings, key)
            keys = frame_keys(key, settings, plan)
            pixels = frame_pixels(ref, plan, settings, policy, keys)
        except VideoInputError as e:
            if on_error == "fail":
                raise
            counts["videos_skipped"] += 1
            if skipped_path is not None:
                with open(skipped_path, "a") as fh:
                    fh.write(json.dumps({"key": key, "error": str(e)}) + "\n")
            continue
        with torch.inference_mode():
            codes = viq_model.encode_pixels([p.to(viq_model.device) for p in pixels])
        for frame_key, c in zip(keys, codes):
            if frame_key not in writer:  # an interrupted earlier run may have stored some frames
                writer.add(frame_key, c)
            counts["video_tokens"] += c.shape[0] * c.shape[1]
        counts["videos_encoded"] += 1
        counts["video_frames_encoded"] += len(keys)
    counts["video_seconds"] = time.perf_counter() - t0
    return counts


def incomplete_video_errors(out_dir) -> list[str]:
    """One line per video with only some of its frames cached (for `extract_codes.py --verify`)."""
    return [f"{out_dir}: video '{prefix}' has only some of its frames cached; rerun the extraction to complete it"
            for prefix in VideoIndex(done_keys(out_dir)).incomplete()]


class VideoFrames:
    """Frames of video records for ConversationDataset: keys, grids, timestamps, pixels."""

    def __init__(self, settings: VideoSettings, source: str, code_store=None, policy=None):
        self.settings, self.source, self.code_store, self.policy = settings, source, code_store, policy
        self._index = None  # built on the first video: an image-only data set never scans the cache's keys

    @property
    def index(self) -> VideoIndex:
        if self._index is None:
            self._index = VideoIndex(self.code_store.keys())
        return self._index

    def resolve(self, ref, key: str):
        """(frame keys, grids, seconds, plan) of one video; plan is None with cached codes.

        Raises KeyError when the cache lacks the video under these settings, VideoInputError
        when an online video cannot be used."""
        if self.source == "codes":
            frames = self.index.complete(video_prefix(key, self.settings))
            if frames is None:
                raise KeyError(f"video '{key}' ({self.settings.tag()}) is not in the code cache {self.code_store.out_dir}")
            keys = [k for _, _, k in frames]
            return keys, [self.code_store.grid(k) for k in keys], [t for _, t, _ in frames], None
        plan = plan_frames(ref, self.settings, key)
        grid = token_grid(plan.height, plan.width, self.settings.frame_policy(self.policy), key)
        return frame_keys(key, self.settings, plan), [grid] * len(plan.indices), [round(t, 3) for t in plan.seconds], plan

    def pixels(self, ref, plan, keys: list[str]) -> list[torch.Tensor]:
        return frame_pixels(ref, plan, self.settings, self.policy, keys)

    def layout(self, conversations: list[dict], seconds: list[float]) -> list[dict]:
        return expand_video_placeholder(conversations, seconds, self.settings.timestamps)


def fit_frames(n_frames: int, length_of, max_len: int) -> tuple[int, int]:
    """(k, length) with k the most leading frames whose sample fits max_len (k = 0: none fits).

    `length_of(k)` is the sample's length with the first k frames; lengths grow with k."""
    k, n = n_frames, length_of(n_frames)
    per_frame = max(1, math.ceil(n / max(1, n_frames)))
    while n > max_len and k > 1:
        k = max(1, k - max(1, math.ceil((n - max_len) / per_frame)))
        n = length_of(k)
    while k < n_frames and length_of(k + 1) <= max_len:  # the step may overshoot; take back what fits
        k, n = k + 1, length_of(k + 1)
    return (k, n) if n <= max_len else (0, n)
