"""Small videos the tests write with PyAV (the library the data layer decodes with)."""
import json
from pathlib import Path

import numpy as np

from data.synthetic_video import write_video
from tests.fixtures import make_colour_dataset


def indexed_frames(n: int, side: int = 64) -> list[np.ndarray]:
    """Frame k is a flat grey of level 8 + 16 k (k < 15), so a decoded frame tells its index."""
    return [np.full((side, side, 3), 8 + 16 * k, dtype=np.uint8) for k in range(n)]


def frame_number(image) -> int:
    """The index of an `indexed_frames` frame from its decoded pixels (codec noise rounds away)."""
    return int(round((float(np.asarray(image, dtype=np.float64).mean()) - 8) / 16))


def make_mixed_dataset(root: Path, n_images: int = 3) -> Path:
    """LLaVA-OneVision-style JSONL: single-image, multi-image and video records (mp4 + webm), plus
    two bad videos (garbage bytes, a missing file) that extraction and datasets must skip and name."""
    root = Path(root)
    train = make_colour_dataset(root, n=n_images)
    lines = train.read_text().splitlines()
    lines.append(json.dumps({"id": "multi", "image": ["images/000.png", "images/001.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "no"}]}))
    write_video(root / "videos" / "grey.mp4", indexed_frames(10, side=56), fps=5, codec="libx264")
    write_video(root / "videos" / "grey.webm", indexed_frames(6, side=84), fps=3, codec="libvpx")
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    for vid, path, question in (("v_mp4", "videos/grey.mp4", "<image>\nDoes it get brighter?"),
                                ("v_webm", "videos/grey.webm", "Does it get darker? <video>"),
                                ("v_broken", "videos/broken.mp4", "<image>\nAnything?"),
                                ("v_missing", "videos/nowhere.mp4", "<image>\nAnything?")):
        lines.append(json.dumps({"id": vid, "video": path, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": "yes"}]}))
    train.write_text("\n".join(lines) + "\n")
    return train
