"""Video samples: frames chosen, decoded and laid out in the LLM sequence like images.

A video (a file path, or encoded bytes from a parquet / `save_to_disk` table) becomes a
handful of frames, each a ViQ image:

- Frame list: the video stream is demuxed once without decoding; the presentation
  timestamps (pts) of its packets are the frames, sorted. Neither `stream.frames` (0 for
  webm) nor `frame.index` (unreliable with threaded decoding) is trusted. Timestamps are
  seconds since the first frame, from pts and the stream's time base, never from a
  sampling step.
- Choice (`VideoSettings`): `fps` 0 samples `max_frames` frames uniformly over the whole
  video (LLaVA-OneVision's rule, rounded rather than floored); `fps` > 0 takes, for each
  instant k / fps, the first frame at or after it, and thins those uniformly to
  `max_frames`. Indices never repeat: a clip shorter than `max_frames` frames gives all its
  frames once, and a source slower than `fps` gives each frame once.
- Decoding: one forward pass from the start, keeping the first frame whose pts is at or
  past each chosen pts (no `seek`, which lands on the previous keyframe).
- Size: each frame is resized by the ViQ resize policy with `max_pixels` lowered to
  `frame_max_pixels`, so 32 frames of a long video fit a 4k context.

Layout (`expand_video_placeholder`): the record's single video placeholder becomes one
`<image>` per frame, in temporal order, one per line, each optionally preceded by its
timestamp (`"1.5s: <image>"`). Every frame is its own `<|vision_start|> ... <|vision_end|>`
span (data/chat.py), so the LLM sees where each frame begins and ends.

Cache keys (`frame_key`): `<video key>|<settings tag>|frame <k>/<n> #<index> @<t>s`, i.e.
the video, the sampling settings, the frame's position among the sampled frames, its index
in the stream and its timestamp. Other settings give other keys, so a cache never mixes
frames of two samplings, and `VideoIndex` tells complete videos from interrupted ones.
"""
from __future__ import annotations

import bisect
import io
import re
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import numpy as np

from data.chat import IMAGE_PLACEHOLDER
from viq.config import from_dict
from viq.errors import ConfigError
from viq.image import ImageInputError, ResizePolicy
from viq.io import atomic_write_json, read_json
from viq.ranges import at_least

VIDEO_PLACEHOLDER = "<video>"
_FRAME_KEY_RE = re.compile(r"^(?P<prefix>.+)\|frame (?P<k>\d+)/(?P<n>\d+) #(?P<index>\d+) @(?P<t>[0-9.]+)s$")


class VideoInputError(ImageInputError):
    """A video that cannot be used (missing, undecodable, no frames); skipped like a bad image."""


@dataclass
class VideoSettings:
    max_frames: int = 32  # LLaVA-OneVision samples 32 frames per video
    fps: float = 0.0  # 0: max_frames spread uniformly over the video; > 0: frames per second, at most max_frames
    frame_max_pixels: int = 224 * 224  # per-frame pixel budget (64 ViQ tokens at 28 px per token)
    timestamps: bool = True  # write each frame's time ("1.5s: ") before its image span

    RANGES: ClassVar[dict] = {"max_frames": at_least(1), "fps": at_least(0), "frame_max_pixels": at_least(28 * 28)}

    def validate(self, where: str = "data.video") -> "VideoSettings":
        """`where`: a config prefix ("data.video" -> 'config key data.video.fps') or a command-line
        one ("--video" -> '--video-fps')."""
        def name(field: str) -> str:
            return f"{where}-{field.replace('_', '-')}" if where.startswith("--") else f"config key '{where}.{field}'"

        if self.max_frames < 1:
            raise ConfigError(f"{name('max_frames')} must be >= 1, got {self.max_frames}")
        if not self.fps >= 0:
            raise ConfigError(f"{name('fps')} must be >= 0 (0: uniform over the video), got {self.fps}")
        if self.frame_max_pixels < 28 * 28:
            raise ConfigError(f"{name('frame_max_pixels')} must be >= 784 (one 28 x 28 token), got {self.frame_max_pixels}")
        return self

    def tag(self) -> str:
        """What the frames' codes depend on; part of every frame's cache key."""
        return f"max_frames={self.max_frames},fps={self.fps:g},frame_max_pixels={self.frame_max_pixels}"

    def frame_policy(self, policy: ResizePolicy) -> ResizePolicy:
        """The image resize policy with the per-frame pixel budget."""
        max_pixels = min(policy.max_pixels, self.frame_max_pixels)
        return replace(policy, max_pixels=max_pixels, min_pixels=min(policy.min_pixels, max_pixels))


@dataclass
class FramePlan:
    """The sampled frames of one video: stream indices, their pts and seconds, and the frame size."""

    label: str
    indices: list[int]
    pts: list[int]
    seconds: list[float]
    height: int
    width: int

    def first(self, n: int) -> "FramePlan":
        return replace(self, indices=self.indices[:n], pts=self.pts[:n], seconds=self.seconds[:n])


def video_label(ref) -> str:
    return f"embedded video ({len(ref)} bytes)" if isinstance(ref, (bytes, bytearray)) else str(ref)


def _open(ref, label: str):
    import av

    try:
        return av.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else str(ref))
    except FileNotFoundError:
        raise VideoInputError(f"{label}: no such video file") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoInputError(f"{label}: cannot open video ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _video_stream(container, label: str):
    if not container.streams.video:
        raise VideoInputError(f"{label}: no video stream")
    return container.streams.video[0]


def select_frames(seconds: list[float], max_frames: int, fps: float = 0.0) -> list[int]:
    """Indices (ascending, distinct) of the frames to keep, given every frame's time in seconds."""
    n = len(seconds)
    if n == 0:
        return []
    if fps > 0:
        step = 1.0 / fps
        chosen, k = [], 0
        # A small tolerance: pts rounding must not push a frame just past its instant.
        while k * step <= seconds[-1] + 1e-6:
            chosen.append(bisect.bisect_left(seconds, k * step - 1e-6))
            k += 1
        candidates = sorted(set(i for i in chosen if i < n))
    else:
        candidates = list(range(n))
    if len(candidates) > max_frames:
        # More candidates than frames wanted: the spacing is >= 1, so rounding keeps them distinct.
        picks = np.linspace(0, len(candidates) - 1, max_frames).round().astype(int)
        candidates = [candidates[j] for j in picks]
    return candidates


def plan_frames(ref, settings: VideoSettings, label: str | None = None) -> FramePlan:
    """Which frames of the video to use, from its packets' timestamps alone (no decoding)."""
    label = label or video_label(ref)
    import av

    with _open(ref, label) as container:
        stream = _video_stream(container, label)
        try:
            all_pts = sorted({p.pts for p in container.demux(stream) if p.pts is not None and p.size})
        except av.error.FFmpegError as e:
            raise VideoInputError(f"{label}: cannot read video packets ({str(e).splitlines()[0]})") from None
        time_base = stream.time_base or Fraction(1, 1)
        height, width = stream.codec_context.height, stream.codec_context.width
    if not all_pts:
        raise VideoInputError(f"{label}: video has no frames")
    if not height or not width:
        raise VideoInputError(f"{label}: video stream has no frame size")
    seconds = [float((p - all_pts[0]) * time_base) for p in all_pts]
    indices = select_frames(seconds, settings.max_frames, settings.fps)
    if not indices:
        raise VideoInputError(f"{label}: zero frames after sampling ({settings.tag()})")
    return FramePlan(label, indices, [all_pts[i] for i in indices], [seconds[i] for i in indices], height, width)


SEEK_GAP_SECONDS = 4.0  # a sampled frame further ahead than this is reached by seeking, not by decoding


def decode_frames(ref, plan: FramePlan, seek_gap_seconds: float | None = SEEK_GAP_SECONDS) -> list:
    """The planned frames as PIL RGB images, in temporal order.

    Frames are decoded forward, keeping for each planned pts the first frame at or past it.
    A planned frame more than `seek_gap_seconds` ahead is reached by seeking to the keyframe
    before it and decoding forward from there (seek lands on the previous keyframe, never on
    the frame itself); a seek that overshoots falls back to decoding from the start."""
    import av

    images = []
    with _open(ref, plan.label) as container:
        stream = _video_stream(container, plan.label)
        stream.thread_type = "AUTO"  # safe: frames are matched by pts, never by frame.index
        gap = int(seek_gap_seconds / stream.time_base) if seek_gap_seconds is not None and stream.time_base else None
        try:
            frames, last, seeked = container.decode(stream), None, False
            for k, target in enumerate(plan.pts):
                seeked = gap is not None and last is not None and target - last > gap
                if seeked:
                    container.seek(target, stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                for frame in frames:
                    if frame.pts is None:
                        continue
                    if seeked and frame.pts > target:
                        break  # no keyframe at or before the target where the index said: start over
                    seeked, last = False, frame.pts
                    if frame.pts >= target:
                        images.append(frame.to_image())
                        break
                if seeked or len(images) <= k:  # overshot, or the stream ended before this frame
                    break
        except av.error.FFmpegError as e:
            raise VideoInputError(f"{plan.label}: cannot decode video ({str(e).splitlines()[0]})") from None
    if seeked and seek_gap_seconds is not None:
        return decode_frames(ref, plan, seek_gap_seconds=None)
    if len(images) != len(plan.pts):
        raise VideoInputError(f"{plan.label}: decoded {len(images)} of its {len(plan.pts)} sampled frames; the file is truncated or corrupt")
    return images


def frame_pixels(ref, plan: FramePlan, settings: VideoSettings, policy: ResizePolicy, keys: list[str]) -> list:
    """Preprocessed frames [3, H, W], resized with the per-frame budget (what the encoder takes)."""
    from viq.image import preprocess

    frame_policy = settings.frame_policy(policy)
    return [preprocess(image, frame_policy, key) for image, key in zip(decode_frames(ref, plan), keys)]


# ----------------------------------------------------------------------------- layout


def frame_layout(seconds: list[float], timestamps: bool) -> str:
    """The text a video placeholder becomes: one `<image>` per frame, one per line."""
    return "\n".join((f"{t:.1f}s: " if timestamps else "") + IMAGE_PLACEHOLDER for t in seconds)


def expand_video_placeholder(conversations: list[dict], seconds: list[float], timestamps: bool) -> list[dict]:
    """A video record's turns with its one `<image>` placeholder replaced by the frames' layout."""
    out, done = [], False
    for turn in conversations:
        value = turn["value"]
        if not done and IMAGE_PLACEHOLDER in value:
            value = value.replace(IMAGE_PLACEHOLDER, frame_layout(seconds, timestamps), 1)
            done = True
        out.append({**turn, "value": value})
    if not done:
        raise ValueError("video record has no '<image>' placeholder to expand")  # parse_record guarantees one
    return out


# ----------------------------------------------------------------------------- cache keys


def video_prefix(video_key: str, settings: VideoSettings) -> str:
    return f"{video_key}|{settings.tag()}"


def frame_keys(video_key: str, settings: VideoSettings, plan: FramePlan) -> list[str]:
    prefix, n = video_prefix(video_key, settings), len(plan.indices)
    return [f"{prefix}|frame {k + 1}/{n} #{index} @{t:.3f}s" for k, (index, t) in enumerate(zip(plan.indices, plan.seconds))]


class VideoIndex:
    """Frame keys of a code cache grouped by video and settings (`prefix`)."""

    def __init__(self, keys):
        self._frames: dict[str, dict[int, tuple[int, float, str]]] = {}
        self._count: dict[str, int] = {}
        for key in keys:
            m = _FRAME_KEY_RE.match(key)
            if m is None:
                continue
            prefix = m.group("prefix")
            self._frames.setdefault(prefix, {})[int(m.group("k"))] = (int(m.group("index")), float(m.group("t")), key)
            self._count[prefix] = int(m.group("n"))

    def complete(self, prefix: str) -> list[tuple[int, float, str]] | None:
        """[(stream index, seconds, key)] of every frame in order, or None when any is missing."""
        frames, n = self._frames.get(prefix), self._count.get(prefix)
        if frames is None or len(frames) != n:
            return None
        return [frames[k] for k in range(1, n + 1)]

    def incomplete(self) -> list[str]:
        """Prefixes of videos with some but not all frames cached (an interrupted extraction)."""
        return sorted(p for p, frames in self._frames.items() if len(frames) != self._count[p])


# ----------------------------------------------------------------------------- export

VIDEO_SETTINGS_FILE = "video.json"


def write_video_settings(export_dir, settings: VideoSettings) -> None:
    """Record the training sampling beside an export, so evaluation lays videos out the same way."""
    atomic_write_json(Path(export_dir) / VIDEO_SETTINGS_FILE, asdict(settings), indent=2)


def read_video_settings(export_dir) -> VideoSettings:
    """The export's sampling settings (data.video of its training run); defaults when absent."""
    path = Path(export_dir) / VIDEO_SETTINGS_FILE
    if not path.is_file():
        return VideoSettings()
    return from_dict(VideoSettings, read_json(path, what="video settings"), source=str(path)).validate(str(path))
