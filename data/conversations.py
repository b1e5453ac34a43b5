"""LLaVA / LLaVA-OneVision conversation records, and weighted dataset mixtures.

A record is `{"id", "image", "conversations"}` where `image` is absent (text only), one path
or a list of paths relative to an image root, and `conversations` a list of LLaVA turns
`{"from": "human"|"gpt"|"system", "value": str}` with one `<image>` placeholder per image
(or none, in which case the images go before the first question; see data/chat.py).
A video record (LLaVA-OneVision / LLaVA-Video) has `"video": path` (or embedded bytes)
instead, and at most one `<image>` (or `<video>`) placeholder, usually in the first turn;
it is normalised to one `<image>` that data/video.py expands into the sampled frames.

Readers (`load_records`): a JSON list, JSON Lines, a local parquet file (or a folder of
them), or a local `datasets.Dataset.save_to_disk` folder. In parquet / HF data the images
may be embedded as `{"bytes": ..., "path": ...}` (the HF `Image` feature); those come back as
raw encoded bytes for the caller to decode (`open_image`). Every malformed input fails with
one line naming the file and the line (JSON Lines) or record index and id.

Mixtures (`load_mixture`) are YAML:

    root: ../..                      # optional; relative paths resolve against it
    sources:                         # (default root: the YAML file's folder)
      - {path: runs/data/synthetic/train.jsonl, image_root: runs/data/synthetic, weight: 1.0}
      - {path: llava_665k.json, image_root: /data/coco, weight: 0.5, format: json}

`mixture_order(sizes, weights, seed, epoch)` turns per-source sampling weights into a
deterministic, seeded interleaving of (source, index) pairs for one epoch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.chat import IMAGE_PLACEHOLDER, ROLE_ALIASES
from data.hf_tables import is_save_to_disk, read_save_to_disk
from data.video import VIDEO_PLACEHOLDER
from viq.config import ConfigError, from_dict
from viq.errors import DataError, MissingFileError
from viq.io import iter_jsonl, read_json, read_yaml

FORMATS = ("json", "jsonl", "parquet", "hf")


@dataclass
class ConversationRecord:
    """One sample. `images` holds absolute paths (str) or embedded encoded images (bytes)."""

    id: str
    conversations: list[dict]
    images: list = field(default_factory=list)
    video: str | bytes | None = None  # a video's path or encoded bytes; then `images` is empty


class RecordError(DataError):
    """A conversation file or record is malformed; the message names file and line/record."""


def _describe(where: str, index: int, raw) -> str:
    record_id = raw.get("id") if isinstance(raw, dict) else None
    return f"{where}: record {index}" + (f" (id={record_id})" if record_id is not None else "")


def _image_refs(value, image_root: Path | None, where: str, column: str = "image") -> list:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    refs = []
    for item in items:
        if isinstance(item, dict):  # HF Image feature: embedded bytes, or a path when not embedded
            if item.get("bytes"):
                refs.append(bytes(item["bytes"]))
                continue
            item = item.get("path")
        if isinstance(item, (bytes, bytearray)):
            refs.append(bytes(item))
        elif isinstance(item, str) and item:
            path = Path(item)
            if not path.is_absolute() and image_root is not None:
                path = image_root / path
            refs.append(str(path))
        else:
            raise RecordError(f"{where}: '{column}' entries must be paths or {{'bytes': ...}}, got {item!r}")
    return refs


def parse_record(raw, where: str, image_root: str | Path | None = None) -> ConversationRecord:
    """Validate one raw record (`where` names it in errors) and resolve its image paths."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected an object with 'conversations', got {type(raw).__name__}")
    turns = raw.get("conversations")
    if turns is None:
        raise RecordError(f"{where}: missing 'conversations' (keys: {', '.join(map(str, raw)) or 'none'})")
    if not isinstance(turns, (list, tuple)) or not turns:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list of turns")
    clean = []
    for t, turn in enumerate(turns):
        # LLaVA spells turns {"from", "value"}; OpenAI-style {"role", "content"} is accepted too.
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise RecordError(f"{where}: turn {t} must be {{'from': ..., 'value': str}}, got {turn!r}"[:300])
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise RecordError(f"{where}: turn {t} has role {role!r}; valid roles: {', '.join(ROLE_ALIASES)}")
        clean.append({"from": role, "value": value})
    root = Path(image_root) if image_root is not None else None
    images = _image_refs(raw.get("image", raw.get("images")), root, where)
    if raw.get("video") is not None:
        return _video_record(raw, clean, images, root, where)
    n_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in clean)
    if n_placeholders and n_placeholders != len(images):
        raise RecordError(f"{where}: {n_placeholders} '<image>' placeholder(s) but {len(images)} image(s)")
    record_id = raw.get("id")
    return ConversationRecord(id=str(record_id) if record_id is not None else "", conversations=clean, images=images)


def _video_record(raw: dict, turns: list[dict], images: list, root: Path | None, where: str) -> ConversationRecord:
    """A LLaVA-OneVision / LLaVA-Video record: one video, its placeholder normalised to one `<image>`."""
    videos = _image_refs(raw["video"], root, where, "video")
    if len(videos) != 1 or images:
        raise RecordError(f"{where}: a video record holds exactly one 'video' and no 'image' "
                          f"(got {len(videos)} video(s), {len(images)} image(s))")
    turns = [{**t, "value": t["value"].replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER)} for t in turns]
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n_placeholders > 1:
        raise RecordError(f"{where}: {n_placeholders} '<image>'/'<video>' placeholders but one video")
    if n_placeholders == 0:  # as for images: the video goes before the first question
        first = next((i for i, t in enumerate(turns) if ROLE_ALIASES[t["from"]] == "user"), None)
        if first is None:
            raise RecordError(f"{where}: a video record needs a human turn to hold the video")
        turns[first] = {**turns[first], "value": IMAGE_PLACEHOLDER + "\n" + turns[first]["value"]}
    record_id = raw.get("id")
    return ConversationRecord(id=str(record_id) if record_id is not None else "", conversations=turns, video=videos[0])


def _read_json(path: Path, image_root) -> list[ConversationRecord]:
    data = read_json(path, what="conversation file")
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [parse_record(raw, _describe(str(path), i, raw), image_root) for i, raw in enumerate(data)]


def _read_jsonl(path: Path, image_root) -> list[ConversationRecord]:
    return [parse_record(raw, f"{path}:{line}", image_root) for line, raw in iter_jsonl(path, what="conversation file")]


def _records_from_table(table, where: str, image_root) -> list[ConversationRecord]:
    if "conversations" not in table.column_names:
        raise RecordError(f"{where}: no 'conversations' column (columns: {', '.join(table.column_names)})")
    return [parse_record(raw, _describe(where, i, raw), image_root) for i, raw in enumerate(table.to_pylist())]


def _read_parquet(path: Path, image_root) -> list[ConversationRecord]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise RecordError(f"{path}: folder holds no .parquet files")
    records = []
    for file in files:
        records += _records_from_table(pq.read_table(file), str(file), image_root)
    return records


def _read_hf(path: Path, image_root, split=None) -> list[ConversationRecord]:
    table = read_save_to_disk(path, split, error=RecordError, split_option="the source's 'split' key")
    return _records_from_table(table, str(path), image_root)


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if is_save_to_disk(path):
            return "hf"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise RecordError(f"{path}: folder is neither a save_to_disk dataset nor holds .parquet files")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise RecordError(f"{path}: cannot tell the format from the name; set format to one of {', '.join(FORMATS)}")


def load_records(
    path: str | Path, image_root: str | Path | None = None, format: str | None = None, split: str | None = None
) -> list[ConversationRecord]:
    """All records of one file/folder; image paths are joined onto `image_root` when relative."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such conversation file or folder")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise RecordError(f"{path}: unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return _read_json(path, image_root)
    if fmt == "jsonl":
        return _read_jsonl(path, image_root)
    if fmt == "parquet":
        return _read_parquet(path, image_root)
    return _read_hf(path, image_root, split)


def open_image(ref):
    """A PIL RGB image from a record's image reference (path or embedded bytes)."""
    from PIL import Image

    source = io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref
    with Image.open(source) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------------- mixtures


@dataclass
class MixtureSource:
    path: str
    image_root: str | None = None
    weight: float = 1.0
    format: str | None = None
    split: str | None = None
    name: str | None = None


@dataclass
class Mixture:
    sources: list[MixtureSource]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def load(self) -> list[list[ConversationRecord]]:
        """Records of every source, in source order."""
        return [load_records(s.path, s.image_root, s.format, s.split) for s in self.sources]


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def load_mixture(yaml_path: str | Path) -> Mixture:
    """Parse a mixture YAML; relative paths resolve against `root` (default: the file's folder)."""
    yaml_path = Path(yaml_path)
    data = read_yaml(yaml_path, what="mixture file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping with 'sources'")
    unknown = sorted(set(data) - {"root", "sources"})
    if unknown:
        raise ConfigError(f"{yaml_path}: unknown key '{unknown[0]}'; valid keys: root, sources")
    base = yaml_path.parent
    if data.get("root") is not None:
        base = Path(_resolve(base, str(data["root"])))
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError(f"{yaml_path}: 'sources' must be a non-empty list of {{path, image_root, weight, format}}")
    sources = []
    for i, raw in enumerate(raw_sources):
        where = f"sources[{i}]"
        if not isinstance(raw, dict) or "path" not in raw:
            raise ConfigError(f"{yaml_path}: {where} must be a mapping with at least 'path'")
        try:
            source = from_dict(MixtureSource, raw, where)
        except ConfigError as error:
            raise ConfigError(f"{yaml_path}: {error}") from None
        if not source.weight >= 0:
            raise ConfigError(f"{yaml_path}: {where}.weight must be >= 0, got {source.weight}")
        if source.format is not None and source.format not in FORMATS:
            raise ConfigError(f"{yaml_path}: {where}.format '{source.format}' is not one of {', '.join(FORMATS)}")
        source.path = _resolve(base, source.path)
        source.image_root = _resolve(base, source.image_root)
        sources.append(source)
    if sum(s.weight for s in sources) <= 0:
        raise ConfigError(f"{yaml_path}: at least one source needs a positive weight")
    return Mixture(sources)


def samples_per_source(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Split `total` draws over sources in proportion to `weights` (largest remainder, exact sum)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(sizes) != len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per source with a positive sum, got {list(weights)} for {len(sizes)}")
    for i, size in enumerate(sizes):
        if w[i] > 0 and size <= 0:
            raise DataError(f"source {i} has weight {w[i]} but no records")
    share = w / w.sum() * total
    counts = np.floor(share).astype(np.int64)
    remainder = total - int(counts.sum())
    # Ties go to the lower source index: stable and independent of the seed.
    order = sorted(range(len(w)), key=lambda i: (-(share[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()


def _source_stream(size: int, seed: int, source: int, start: int, count: int) -> np.ndarray:
    """Indices [start, start + count) of an endless stream of seeded permutations of range(size).

    Every record appears once per pass, so a down-weighted source still covers all its records
    over successive epochs, and an up-weighted one repeats only after a full pass.
    """
    out = []
    first_pass, offset = divmod(start, size)
    k = first_pass
    while sum(len(o) for o in out) < count:
        perm = np.random.default_rng([seed, source, k]).permutation(size)
        out.append(perm[offset:])
        offset = 0
        k += 1
    return np.concatenate(out)[:count] if out else np.zeros(0, dtype=np.int64)


def mixture_order(
    sizes: list[int], weights: list[float], *, seed: int, epoch: int, samples_per_epoch: int | None = None
) -> np.ndarray:
    """Deterministic weighted interleaving of one epoch: int64 array [N, 2] of (source, index) rows.

    N defaults to sum(sizes). Source i contributes exactly `samples_per_source(...)[i]` rows
    (N * w_i / sum(w), rounded by largest remainder), drawn from its permutation stream where
    the previous epoch stopped; the rows are then shuffled with a generator seeded by
    (seed, epoch). Same arguments, same order, on every machine.
    """
    total = int(sum(sizes) if samples_per_epoch is None else samples_per_epoch)
    counts = samples_per_source(sizes, weights, total)
    columns = []
    for source, (size, count) in enumerate(zip(sizes, counts)):
        if count == 0:
            continue
        indices = _source_stream(size, seed, source, epoch * count, count)
        columns.append(np.stack([np.full(count, source, dtype=np.int64), indices.astype(np.int64)], axis=1))
    order = np.concatenate(columns) if columns else np.zeros((0, 2), dtype=np.int64)
    shuffle = np.random.default_rng([seed, 1_000_003, epoch]).permutation(len(order))
    return order[shuffle]
