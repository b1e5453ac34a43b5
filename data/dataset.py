"""Training samples from conversation records, with codes from the cache or the encoder.

`vision.source: codes` reads each image's [h, w, 4] codes from the code cache
(data.shards.CodeStore); `online` returns preprocessed pixels for the trainer to encode
with the ViQ model in the loop. Both build the same token sequence: the image's token grid
comes from the cache (codes) or from the image size through the ViQ resize policy
(online), and the two agree because extraction used that very policy.

Records whose images are missing from the cache (extraction skipped a corrupt file) are
left out, counted in `skipped` and reported; nothing is dropped silently.

Video records (data/video.py) become their sampled frames, in order, each an image of the
sample (data/video_codes.py). With `max_len` and `overlong="truncate"`, a video sample
longer than max_len keeps as many leading whole frames as fit (counted in
`n_video_truncated`); with "drop" it is left to the loader, which drops and counts it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.chat import build_sample
from data.conversations import ConversationRecord
from data.video import VideoSettings
from data.video_codes import VideoFrames, fit_frames
from data.vocab import IGNORE_INDEX, SUBCODES, CodeVocab
from viq.errors import ConfigError
from viq.image import ImageInputError, ResizePolicy, preprocess, token_grid

_EXIF_SWAPS_SIDES = {5, 6, 7, 8}
# Where the image positions' codes come from: the code cache, or the ViQ encoder in the loop;
# `none` is the blind baseline: the image positions stay (grid from the image header, as online)
# but every sub-code is BLIND_CODE, so the model can only learn the text prior.
VISION_SOURCES = ("codes", "online", "none")
BLIND_CODE = 0


def image_key(ref, record_id: str, k: int, image_root: str | os.PathLike | None) -> str:
    """Cache key of one image reference: its path relative to the image root, or, for
    embedded bytes, the record id and image number plus a content hash."""
    if isinstance(ref, (bytes, bytearray)):
        return f"{record_id}#{k}:{hashlib.sha1(ref).hexdigest()[:16]}"
    path = Path(ref)
    if image_root is not None:
        try:
            return path.resolve().relative_to(Path(image_root).resolve()).as_posix()
        except ValueError:
            pass
    return path.resolve().as_posix()


def image_size(ref) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header without decoding."""
    import io

    source = io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref
    label = "embedded image" if isinstance(ref, (bytes, bytearray)) else str(ref)
    try:
        with Image.open(source) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in _EXIF_SWAPS_SIDES:
                w, h = h, w
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{label}: cannot read image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return h, w


class ConversationDataset:
    """`len`, `length(i)` (cheap, precomputed) and `dataset[i] -> sample dict` for PackedLoader."""

    def __init__(
        self,
        records: list[ConversationRecord],
        tokenizer,
        vocab: CodeVocab,
        *,
        source: str,
        image_root: str | os.PathLike | None,
        code_store=None,
        resize_policy: ResizePolicy | None = None,
        system: str | None = None,
        video: VideoSettings | None = None,
        max_len: int | None = None,
        overlong: str = "truncate",
    ):
        if source not in VISION_SOURCES:
            raise ConfigError(f"vision.source must be one of {', '.join(VISION_SOURCES)}, got '{source}'")
        if source == "codes" and code_store is None:
            raise ValueError("source 'codes' needs a code store (data.shards.CodeStore)")
        if source in ("online", "none") and resize_policy is None:
            raise ValueError(f"source '{source}' needs the ViQ resize policy")
        self.tokenizer, self.vocab, self.source = tokenizer, vocab, source
        self.image_root, self.code_store, self.policy, self.system = image_root, code_store, resize_policy, system
        self.records: list[ConversationRecord] = []
        self.keys: list[list[str]] = []
        self.grids: list[list[tuple[int, int]]] = []
        self.skipped: dict[str, int] = {}
        self.skipped_examples: list[str] = []
        self.videos = VideoFrames(video or VideoSettings(), source, code_store, resize_policy)
        self.video_plans: dict[int, object] = {}  # sample index -> data.video.FramePlan (online videos)
        self.n_video_truncated = 0
        lengths, first = [], []
        for record in records:
            keys = [image_key(ref, record.id, k, image_root) for k, ref in enumerate(record.images)]
            try:
                if record.video is not None:
                    record, keys, grids, n, supervised_from = self._video_sample(record, max_len, overlong)
                else:
                    grids = [self._grid(ref, key) for ref, key in zip(record.images, keys)]
                    n, supervised_from = self._measure(record.conversations, grids)
            except (KeyError, ImageInputError, ValueError) as e:
                reason = type(e).__name__ if not isinstance(e, KeyError) else "codes missing from the cache"
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                if len(self.skipped_examples) < 5:
                    self.skipped_examples.append(f"record {record.id or len(self.records)}: {str(e).strip(chr(39))}")
                continue
            self.records.append(record)
            self.keys.append(keys)
            self.grids.append(grids)
            lengths.append(n)
            first.append(supervised_from)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._first_supervised = np.asarray(first, dtype=np.int64)

    def _measure(self, conversations: list[dict], grids) -> tuple[int, int]:
        """(length, position of the first supervised token, or the length when none is)."""
        sample = build_sample(self.tokenizer, self.vocab, conversations, grids, system=self.system)
        n = int(sample["input_ids"].numel())
        supervised = torch.nonzero(sample["labels"] != IGNORE_INDEX)
        return n, int(supervised[0]) if len(supervised) else n

    def _video_sample(self, record: ConversationRecord, max_len: int | None, overlong: str):
        """(record with the frames laid out, frame keys, grids, length, first supervised position) of a video record."""
        keys, grids, seconds, plan = self.videos.resolve(record.video, image_key(record.video, record.id, 0, self.image_root))
        n_frames = len(keys)

        def measure(k: int) -> tuple[int, int]:
            return self._measure(self.videos.layout(record.conversations, seconds[:k]), grids[:k])

        n, supervised_from = measure(n_frames)
        if max_len is not None and n > max_len and overlong == "truncate":
            n_frames, n = fit_frames(n_frames, lambda k: measure(k)[0], max_len)
            if n_frames == 0:
                raise ValueError(f"video '{keys[0].split('|')[0]}': not even one frame fits max_seq_len={max_len} ({n} tokens)")
            self.n_video_truncated += 1
            n, supervised_from = measure(n_frames)
        if plan is not None:
            self.video_plans[len(self.records)] = plan.first(n_frames)
        turns = self.videos.layout(record.conversations, seconds[:n_frames])
        expanded = ConversationRecord(id=record.id, conversations=turns, video=record.video)
        return expanded, keys[:n_frames], grids[:n_frames], n, supervised_from

    def _grid(self, ref, key: str) -> tuple[int, int]:
        if self.source == "codes":
            if key not in self.code_store:
                raise KeyError(f"image '{key}' is not in the code cache {self.code_store.out_dir}")
            return tuple(self.code_store.grid(key))
        h, w = image_size(ref)
        return token_grid(h, w, self.policy, str(key))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.records)

    def length(self, index: int) -> int:
        return int(self._lengths[index])

    def first_supervised(self, index: int) -> int:
        """Position of the sample's first supervised token (its length when it has none)."""
        return int(self._first_supervised[index])

    def __getitem__(self, index: int) -> dict:
        record, grids = self.records[index], self.grids[index]
        sample = build_sample(self.tokenizer, self.vocab, record.conversations, grids, system=self.system)
        out = {"input_ids": sample["input_ids"], "labels": sample["labels"]}
        if self.source == "codes":
            parts = [self.code_store.get(key).reshape(-1, SUBCODES) for key in self.keys[index]]
            codes = torch.cat(parts) if parts else torch.zeros((0, SUBCODES), dtype=torch.long)
            out["codes"] = self.vocab.codes_to_ids(codes)
        elif self.source == "none":
            n = sum(h * w for h, w in grids)
            out["codes"] = self.vocab.codes_to_ids(torch.full((n, SUBCODES), BLIND_CODE, dtype=torch.long))
        else:
            plan = self.video_plans.get(index)
            pixels = (self.videos.pixels(record.video, plan, self.keys[index]) if plan is not None
                      else [preprocess(ref, self.policy, key) for ref, key in zip(record.images, self.keys[index])])
            for p, (h, w), key in zip(pixels, grids, self.keys[index]):
                f = self.policy.factor
                if (p.shape[1] // f, p.shape[2] // f) != (h, w):
                    raise ImageInputError(f"{key}: decoded size gives grid {(p.shape[1] // f, p.shape[2] // f)}, "
                                          f"header gave {(h, w)}; the file changed or its header lies")
            out["images"] = pixels
        return out
