"""Small on-disk data sets the tests build themselves."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


def make_colour_dataset(root: Path, n: int = 24, seed: int = 0, text_only_every: int = 0) -> Path:
    """n images of one colour each (varied sizes), LLaVA JSONL asking for the colour; with
    text_only_every=k every k-th record is a text-only conversation instead."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    names = list(COLOURS)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 200, 2))
        colour = names[i % len(names)]
        if text_only_every and i % text_only_every == 0:
            lines.append(json.dumps({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"Name colour number {i % 3 + 1} of red, green, blue."},
                {"from": "gpt", "value": colour}]}))
            continue
        pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        lines.append(json.dumps({
            "id": f"c{i}", "image": f"images/{i:03d}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is this image?"},
                              {"from": "gpt", "value": colour}],
        }))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
