"""A procedurally drawn image-question data set whose answers are known by construction.

Three families, each a miniature of a benchmark the project reports:
- charts (ChartQA-like): bar and line charts with labelled values; "What is the value of
  Tue?" -> "17", "Which category has the highest value?" -> "Tue".
- documents (DocVQA / OCRBench-like): receipts and invoices; "What is the total?" -> "23.50".
- shapes (MMStar / AI2D-like multiple choice): coloured circles, squares and triangles to
  count or identify; options A-D, the answer is the letter.

Images are drawn with PIL only (its bundled font), at random sizes between 112 and 448 px
per side, so the any-resolution path sees varied aspect ratios. Everything derives from
the seed: sample i uses its own generator seeded by (seed, i), so the first k samples are
the same whatever the total, and the same seed gives byte-identical files with the same
Pillow build. Answers are one word or number, small enough for a tiny model to learn.

`make_synthetic_dataset(out, n, seed, val_fraction)` writes
    out/images/<id>.png
    out/train.jsonl, out/val.jsonl                LLaVA format (image path relative to out/)
    out/vlmeval/SYNTH_CHART.tsv, SYNTH_DOC.tsv, SYNTH_SHAPES.tsv   (validation split)
The TSVs follow VLMEvalKit's layout: index, image (base64 PNG), question, answer, category,
plus A-D for the multiple-choice file. Training prompts are what VLMEvalKit asks for these
benchmark types, so a model trained here is evaluated on the prompt it learned: the question
plus "\nAnswer the question using a single word or phrase." for charts and documents
(`vqa_prompt`), its default multiple-choice prompt (`mcq_prompt`) for shapes.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data.chat import MCQ_INSTRUCTION, VQA_SUFFIX
from viq.errors import ConfigError
from viq.io import atomic_write, atomic_write_json

MIN_SIDE, MAX_SIDE = 112, 448
FAMILIES = ("chart", "doc", "shapes")
TSV_NAMES = {"chart": "SYNTH_CHART", "doc": "SYNTH_DOC", "shapes": "SYNTH_SHAPES"}
OPTION_LETTERS = ("A", "B", "C", "D")

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
LABEL_SETS = (
    ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat"),
    ("A", "B", "C", "D", "E", "F"),
    ("2019", "2020", "2021", "2022", "2023", "2024"),
    ("Tea", "Milk", "Rice", "Corn", "Salt", "Soap"),
)
CHART_TITLES = ("Sales", "Visitors", "Orders", "Rainfall", "Scores", "Units")
STORES = ("FreshMart", "QuickShop", "CornerCafe", "SunMarket", "BlueBakery", "CityDeli")
ITEMS = ("Apple", "Bread", "Milk", "Eggs", "Cheese", "Coffee", "Juice", "Pasta", "Butter", "Tea")
CUSTOMERS = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goro", "Hana")


@dataclass
class SyntheticSample:
    family: str
    category: str
    image: Image.Image
    question: str
    answer: str
    options: list[str] = field(default_factory=list)  # A-D texts for multiple choice

    @property
    def prompt(self) -> str:
        return mcq_prompt(self.question, self.options) if self.options else vqa_prompt(self.question)


def vqa_prompt(question: str) -> str:
    """VLMEvalKit's ImageVQADataset prompt (ChartQA / DocVQA style), also LLaVA's training suffix."""
    return question + VQA_SUFFIX


def mcq_prompt(question: str, options: list[str]) -> str:
    """VLMEvalKit's default multiple-choice prompt (no hint), character for character."""
    lines = "".join(f"{letter}. {text}\n" for letter, text in zip(OPTION_LETTERS, options))
    return f"Question: {question}\nOptions:\n{lines}{MCQ_INSTRUCTION}"


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, int(size)))


def _canvas(rng: random.Random, background=(255, 255, 255)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    image = Image.new("RGB", (width, height), background)
    return image, ImageDraw.Draw(image)


def _centred_text(draw, x: float, y: float, text: str, font, fill=(0, 0, 0)) -> None:
    draw.text((x, y), text, font=font, fill=fill, anchor="mm")


# ----------------------------------------------------------------------------- charts


def draw_chart(rng: random.Random) -> SyntheticSample:
    kind = rng.choice(("bar", "line"))
    image, draw = _canvas(rng)
    width, height = image.size
    labels = list(rng.choice(LABEL_SETS)[: rng.randint(3, 6)])
    values = rng.sample(range(1, 60), len(labels))  # distinct, so "highest" is unambiguous
    font = _font(max(9, min(width / (len(labels) * 3.2), height / 14)))
    title = rng.choice(CHART_TITLES)
    _centred_text(draw, width / 2, height * 0.06, title, font)

    left, right = width * 0.12, width * 0.97
    top, bottom = height * 0.16, height * 0.84
    top_value = 10 * math.ceil(max(values) / 10)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=1)
    for tick in range(0, top_value + 1, 10 if top_value <= 30 else 20):
        y = bottom - (bottom - top) * tick / top_value
        draw.line([(left - 3, y), (right, y)], fill=(225, 225, 225) if tick else (0, 0, 0), width=1)
        draw.text((left - 5, y), str(tick), font=_font(font.size * 0.8), fill=(90, 90, 90), anchor="rm")

    slot = (right - left) / len(labels)
    colour = rng.choice(list(COLOURS.values()))
    points = []
    for i, (label, value) in enumerate(zip(labels, values)):
        x = left + slot * (i + 0.5)
        y = bottom - (bottom - top) * value / top_value
        points.append((x, y))
        if kind == "bar":
            draw.rectangle([x - slot * 0.3, y, x + slot * 0.3, bottom], fill=colour)
        _centred_text(draw, x, y - font.size * 0.7, str(value), font)
        _centred_text(draw, x, bottom + font.size * 0.8, label, font)
    if kind == "line":
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)

    if rng.random() < 0.6:
        target = rng.randrange(len(labels))
        question = f"What is the value of {labels[target]}?"
        answer, category = str(values[target]), f"{kind}_value"
    else:
        question = "Which category has the highest value?"
        answer, category = labels[values.index(max(values))], f"{kind}_max"
    return SyntheticSample("chart", category, image, question, answer)


# ----------------------------------------------------------------------------- documents


def _write_lines(draw, lines: list[str], width: int, height: int, rng: random.Random) -> None:
    longest = max(len(line) for line in lines)
    size = min(height / (len(lines) * 1.5 + 1), width / (longest * 0.62 + 2))
    font = _font(size)
    x = width * rng.uniform(0.04, 0.08)
    y = (height - len(lines) * font.size * 1.4) / 2
    for line in lines:
        draw.text((x, y), line, font=font, fill=(20, 20, 20))
        y += font.size * 1.4


def draw_document(rng: random.Random) -> SyntheticSample:
    image, draw = _canvas(rng, background=rng.choice([(255, 255, 255), (250, 247, 235), (240, 244, 250)]))
    width, height = image.size
    if rng.random() < 0.5:
        store = rng.choice(STORES)
        items = rng.sample(ITEMS, rng.randint(2, 4))
        prices = [rng.randint(50, 1500) for _ in items]  # cents
        total = sum(prices)
        lines = [store, "-" * 12] + [f"{item} {p / 100:.2f}" for item, p in zip(items, prices)]
        lines += ["-" * 12, f"TOTAL {total / 100:.2f}"]
        _write_lines(draw, lines, width, height, rng)
        pick = rng.random()
        if pick < 0.5:
            return SyntheticSample("doc", "receipt_total", image, "What is the total?", f"{total / 100:.2f}")
        if pick < 0.75:
            return SyntheticSample("doc", "receipt_store", image, "What is the name of the store?", store)
        target = rng.randrange(len(items))
        return SyntheticSample(
            "doc", "receipt_item", image, f"What is the price of {items[target]}?", f"{prices[target] / 100:.2f}"
        )
    number = rng.randint(1000, 9999)
    date = f"{rng.randint(2015, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    customer = rng.choice(CUSTOMERS)
    amount = rng.randint(10, 999)
    lines = ["INVOICE", f"No: {number}", f"Date: {date}", f"Name: {customer}", f"Due: {amount}"]
    _write_lines(draw, lines, width, height, rng)
    field_name, question, answer = rng.choice([
        ("number", "What is the invoice number?", str(number)),
        ("date", "What is the date?", date),
        ("name", "What is the customer's name?", customer),
        ("due", "What is the amount due?", str(amount)),
    ])
    return SyntheticSample("doc", f"invoice_{field_name}", image, question, answer)


# ----------------------------------------------------------------------------- shapes


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(0, 0, 0))
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(0, 0, 0))
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill, outline=(0, 0, 0))


def _count_options(rng: random.Random, correct: int) -> list[str]:
    pool = [c for c in range(max(0, correct - 3), correct + 4) if c != correct]
    return [str(c) for c in [correct] + rng.sample(pool, 3)]


def draw_shapes(rng: random.Random) -> SyntheticSample:
    image, draw = _canvas(rng, background=rng.choice([(255, 255, 255), (245, 245, 245), (235, 240, 230)]))
    width, height = image.size
    cols, rows = max(2, round(width / 75)), max(2, round(height / 75))
    cells = rng.sample(range(cols * rows), min(cols * rows, rng.randint(2, 8)))
    radius = 0.32 * min(width / cols, height / rows)
    objects = []
    for cell in cells:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        cx = (cell % cols + 0.5 + rng.uniform(-0.1, 0.1)) * width / cols
        cy = (cell // cols + 0.5 + rng.uniform(-0.1, 0.1)) * height / rows
        _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour])
        objects.append((shape, colour))

    unique_shapes = [s for s in SHAPES if sum(o[0] == s for o in objects) == 1]
    kind = rng.choice(["count_shape", "count_colour"] + (["colour_of"] if unique_shapes else []))
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        question = f"How many {shape}s are there in the image?"
        options = _count_options(rng, sum(o[0] == shape for o in objects))
    elif kind == "count_colour":
        colour = rng.choice(sorted({o[1] for o in objects}))
        question = f"How many {colour} shapes are there in the image?"
        options = _count_options(rng, sum(o[1] == colour for o in objects))
    else:
        shape = rng.choice(unique_shapes)
        colour = next(o[1] for o in objects if o[0] == shape)
        question = f"What colour is the {shape}?"
        options = [colour] + rng.sample([c for c in COLOURS if c != colour], 3)
    correct = options[0]
    rng.shuffle(options)
    return SyntheticSample("shapes", kind, image, question, OPTION_LETTERS[options.index(correct)], options)


DRAWERS = {"chart": draw_chart, "doc": draw_document, "shapes": draw_shapes}


def make_sample(seed: int, index: int) -> SyntheticSample:
    """Sample `index` of the data set with this seed (families cycle chart, doc, shapes)."""
    rng = random.Random(f"viq-synthetic:{seed}:{index}")
    return DRAWERS[FAMILIES[index % len(FAMILIES)]](rng)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def make_synthetic_dataset(out: str | Path, n: int, seed: int = 0, val_fraction: float = 0.1, n_videos: int = 0) -> dict:
    """Draw `n` samples into `out` (see the module docstring); returns a summary dict.

    `n_videos` > 0 appends that many moving-shape videos (data/synthetic_video.py) after the
    image records of each split and writes vlmeval/SYNTH_VIDEO.tsv; the image records are the
    same as without them."""
    if n <= 0:
        raise ConfigError(f"--n must be positive, got {n}")
    if n_videos < 0:
        raise ConfigError(f"--videos must be >= 0, got {n_videos}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "vlmeval").mkdir(exist_ok=True)
    n_val = round(n * val_fraction)
    val_indices = set(random.Random(f"viq-synthetic-split:{seed}").sample(range(n), n_val))

    splits: dict[str, list[dict]] = {"train": [], "val": []}
    tsv_rows: dict[str, list[dict]] = {family: [] for family in FAMILIES}
    for index in range(n):
        sample = make_sample(seed, index)
        sample_id = f"synth_{sample.family}_{index:06d}"
        png = _png(sample.image)
        (out / "images" / f"{sample_id}.png").write_bytes(png)
        split = "val" if index in val_indices else "train"
        splits[split].append({
            "id": sample_id,
            "image": f"images/{sample_id}.png",
            "conversations": [
                {"from": "human", "value": "<image>\n" + sample.prompt},
                {"from": "gpt", "value": sample.answer},
            ],
            "category": sample.category,
        })
        if split == "val":
            row = {"index": len(tsv_rows[sample.family]), "image": base64.b64encode(png).decode("ascii"),
                   "question": sample.question}
            row.update(zip(OPTION_LETTERS, sample.options))
            row.update({"answer": sample.answer, "category": sample.category})
            tsv_rows[sample.family].append(row)

    for family, rows in tsv_rows.items():
        columns = ["index", "image", "question"] + (list(OPTION_LETTERS) if family == "shapes" else [])
        _write_tsv(out / "vlmeval" / f"{TSV_NAMES[family]}.tsv", rows, columns + ["answer", "category"])
    summary = {"out": str(out), "n": n, "seed": seed, "train": len(splits["train"]), "val": len(splits["val"]),
               "val_per_benchmark": {TSV_NAMES[f]: len(r) for f, r in tsv_rows.items()}}
    if n_videos:
        from data.synthetic_video import TSV_NAME, make_synthetic_videos

        video_train, video_val, video_rows = make_synthetic_videos(out, n_videos, seed, val_fraction)
        splits["train"] += video_train
        splits["val"] += video_val
        _write_tsv(out / "vlmeval" / f"{TSV_NAME}.tsv", video_rows, ["index", "video", "question", *OPTION_LETTERS, "answer", "category"])
        summary.update(n_videos=n_videos, train=len(splits["train"]), val=len(splits["val"]))
        summary["val_per_benchmark"][TSV_NAME] = len(video_rows)
    atomic_write_json(out / "meta.json", summary, indent=2)
    # train.jsonl last, each file atomic: the trainer regenerates the set when train.jsonl is absent,
    # so its presence must mean a complete data set (a killed run left a partial one behind before).
    for split in ("val", "train"):
        atomic_write(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[split]))
    return summary
