"""Synthetic videos for the demo: a coloured shape moving across the frame.

"Which way does the red circle move?" with options left / right / up / down (A-D, shuffled),
answered by construction. Videos are short MPEG-4 files written with PyAV (the decoder the
data layer reads them with), 112 x 112 px, 8 frames at 4 fps. Video sample i uses its own
generator seeded by (seed, i), independent of the image samples, so adding videos to a
demo set leaves its image records and their order untouched.

`make_synthetic_videos(out, n, seed, val_fraction)` writes out/videos/<id>.mp4 and returns
the train / validation records (LLaVA-Video layout: `"video"` and an `<image>` placeholder in
the first turn) and the rows of out/vlmeval/SYNTH_VIDEO.tsv (index, video path relative to
the TSV's folder, question, A-D, answer, category), VLMEvalKit's video-benchmark layout.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.synthetic import COLOURS, OPTION_LETTERS, SHAPES, _draw_shape, mcq_prompt

DIRECTIONS = ("left", "right", "up", "down")
VIDEO_SIDE, VIDEO_FRAMES, VIDEO_FPS = 112, 8, 4
TSV_NAME = "SYNTH_VIDEO"


def write_video(path, frames: list[np.ndarray], fps: int = VIDEO_FPS, codec: str = "mpeg4") -> Path:
    """Encode RGB uint8 frames [H, W, 3] (even sides) into a video file with PyAV."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless at this size: the shape keeps its colour
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())
    return path


def moving_shape_frames(rng: random.Random) -> tuple[list[np.ndarray], str, str, str]:
    """(frames, colour, shape, direction) of one clip."""
    colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
    radius = rng.randint(10, 16)
    lo, hi = radius + 4, VIDEO_SIDE - radius - 4
    across = rng.uniform(lo + 20, hi - 20)  # the coordinate that stays put
    frames = []
    for k in range(VIDEO_FRAMES):
        t = k / (VIDEO_FRAMES - 1)
        along = lo + (hi - lo) * (t if direction in ("right", "down") else 1 - t)
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        image = Image.new("RGB", (VIDEO_SIDE, VIDEO_SIDE), (255, 255, 255))
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, COLOURS[colour])
        frames.append(np.asarray(image))
    return frames, colour, shape, direction


def make_synthetic_videos(out, n: int, seed: int = 0, val_fraction: float = 0.1) -> tuple[list[dict], list[dict], list[dict]]:
    """(train records, validation records, SYNTH_VIDEO.tsv rows) of n clips written under out/videos/."""
    out = Path(out)
    n_val = round(n * val_fraction)
    val_indices = set(random.Random(f"viq-synthetic-video-split:{seed}").sample(range(n), n_val))
    train, val, rows = [], [], []
    for index in range(n):
        rng = random.Random(f"viq-synthetic-video:{seed}:{index}")
        frames, colour, shape, direction = moving_shape_frames(rng)
        options = list(DIRECTIONS)
        rng.shuffle(options)
        answer = OPTION_LETTERS[options.index(direction)]
        question = f"Which way does the {colour} {shape} move?"
        sample_id = f"synth_video_{index:06d}"
        write_video(out / "videos" / f"{sample_id}.mp4", frames)
        record = {"id": sample_id, "video": f"videos/{sample_id}.mp4",
                  "conversations": [{"from": "human", "value": "<image>\n" + mcq_prompt(question, options)},
                                    {"from": "gpt", "value": answer}],
                  "category": "direction"}
        if index in val_indices:
            val.append(record)
            rows.append({"index": len(rows), "video": f"../videos/{sample_id}.mp4", "question": question,
                         **dict(zip(OPTION_LETTERS, options)), "answer": answer, "category": "direction"})
        else:
            train.append(record)
    return train, val, rows
