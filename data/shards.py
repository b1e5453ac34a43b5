"""The code cache: ViQ codes of every image, extracted once and read at training time.

Each image's codes are an integer tensor [h, w, 4] of FSQ indices in [0, K). On disk:

    out_dir/
      meta.json                      FSQ levels, codebook size, tokenizer name, ... (whatever
                                     the extractor records); a writer or reader with other
                                     meta is refused, so a stale cache is never mixed in
      codes-{rank:03d}-{n:05d}.bin   raw codes, records back to back, little-endian uint16
                                     when K <= 65536 else uint32 (8 or 16 bytes per ViQ token)
      codes-{rank:03d}-{n:05d}.idx.json
                                     that shard's index: dtype, nbytes, sha256, meta and
                                     "records", columnar: keys, h, w, offset, nbytes, crc32
      manifest.json                  built by merge_manifests: every shard with its sha256,
                                     byte size and record count, and the meta

Crash safety: a shard is written to `<name>.bin.tmp`, renamed when complete, and only then
is its index written (atomically too). A shard is *listed* when its index exists, so a
killed extraction leaves no listed partial shard. Progress inside the open shard is kept by
`commit()`: the .bin.tmp is fsynced and `<name>.progress.json` (its committed byte count
and records) replaced atomically; a new ShardWriter of the same rank cuts the .bin.tmp back
to the committed bytes and continues that shard, so a resumed extraction writes the same
bytes as an uninterrupted one. Anything else a killed writer left is removed, and
`done_keys` (listed shards plus committed progress) tells the extractor what to skip. Ranks
write disjoint files (rank in the name); merge_manifests builds the single index and
refuses a key written twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from data.vocab import SUBCODES
from viq.errors import DataError
from viq.io import atomic_write, fsync_dir, read_json

FORMAT_NAME = "viq-code-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
META_FILE = "meta.json"
DEFAULT_SHARD_BYTES = 256 << 20
PIXELS_PER_TOKEN = 28  # one ViQ token covers 28 x 28 pixels (14 px patches, 2 x 2 sub-codes)

_SHARD_RE = re.compile(r"^codes-(\d{3})-(\d{5})\.(bin|bin\.tmp|idx\.json|progress\.json)$")


class ShardError(DataError):
    """The code cache is missing, damaged or does not match; the message names file and key."""


def shard_stem(rank: int, n: int) -> str:
    return f"codes-{rank:03d}-{n:05d}"


def code_dtype(codebook_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype holding indices in [0, codebook_size)."""
    if codebook_size <= 1 << 16:
        return np.dtype("<u2")
    if codebook_size <= 1 << 32:
        return np.dtype("<u4")
    raise ShardError(f"codebook_size {codebook_size} exceeds 2^32; codes cannot be stored as uint32")


def compression_ratio(h: int, w: int, nbytes: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> float:
    """Raw RGB bytes of the resized image (h*28 x w*28 x 3, uint8) over the bytes of its codes."""
    return (h * pixels_per_token) * (w * pixels_per_token) * 3 / nbytes


def _write_json(path: Path, obj) -> None:
    # Compact: an index lists every key of its shard.
    atomic_write(path, json.dumps(obj, separators=(",", ":")))


def _read_json(path: Path):
    try:
        return read_json(path, what="code cache file")
    except DataError as e:  # damaged cache files are ShardErrors, as every other cache problem
        raise ShardError(str(e)) from None


def _normalise_meta(meta: dict | None) -> dict:
    if not isinstance(meta, dict) or "codebook_size" not in meta:
        raise ShardError("shard meta must be a dict with at least 'codebook_size' (and ideally 'levels', 'tokenizer')")
    meta = json.loads(json.dumps(meta))  # JSON form, so comparisons match what is on disk
    if not isinstance(meta["codebook_size"], int) or meta["codebook_size"] <= 0:
        raise ShardError(f"meta 'codebook_size' must be a positive integer, got {meta['codebook_size']!r}")
    if "levels" in meta and int(np.prod(meta["levels"])) != meta["codebook_size"]:
        raise ShardError(f"meta 'levels' {meta['levels']} multiply to {int(np.prod(meta['levels']))}, not codebook_size {meta['codebook_size']}")
    return meta


def _meta_difference(expected: dict, found: dict) -> str | None:
    """First key of `expected` that `found` lacks or holds differently, described in one line."""
    for key in sorted(expected):
        if key not in found:
            return f"'{key}' is missing (expected {expected[key]!r})"
        if found[key] != expected[key]:
            return f"'{key}' is {found[key]!r}, expected {expected[key]!r}"
    return None


def _shard_files(out_dir: Path) -> dict[tuple[int, int], set[str]]:
    """(rank, n) -> kinds of files present ('bin', 'bin.tmp', 'idx.json')."""
    found: dict[tuple[int, int], set[str]] = {}
    for name in os.listdir(out_dir):
        m = _SHARD_RE.match(name)
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
    return found


def _listed_indexes(out_dir: Path) -> list[Path]:
    """Index files of complete shards, sorted by name (rank, then shard number)."""
    return sorted(
        out_dir / f"{shard_stem(r, n)}.idx.json" for (r, n), kinds in _shard_files(out_dir).items() if "idx.json" in kinds
    )


def done_keys(out_dir: str | os.PathLike) -> set[str]:
    """Keys whose codes are in a complete (listed) shard of `out_dir`, from every rank."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return set()
    keys: set[str] = set()
    for idx_path in _listed_indexes(out_dir):
        keys.update(_read_json(idx_path)["records"]["keys"])
    for (r, n), kinds in _shard_files(out_dir).items():
        if {"bin.tmp", "progress.json"} <= kinds and "idx.json" not in kinds:  # committed, not yet finished
            keys.update(_read_json(out_dir / f"{shard_stem(r, n)}.progress.json")["records"]["keys"])
    return keys


class ShardWriter:
    """Appends images' codes to this rank's shards; see the module docstring for the layout.

    One writer per rank at a time (it removes its own rank's unfinished files on start).
    Keys already present in any listed shard are refused: check `key in writer` first.
    """

    def __init__(self, out_dir: str | os.PathLike, rank: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES, meta: dict | None = None):
        if not 0 <= rank <= 999:
            raise ShardError(f"rank must be in [0, 999], got {rank}")
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.shard_bytes = int(shard_bytes)
        self.meta = _normalise_meta(meta)
        self.dtype = code_dtype(self.meta["codebook_size"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.out_dir / META_FILE
        if meta_path.exists():
            diff = _meta_difference(self.meta, _read_json(meta_path))
            if diff:
                raise ShardError(f"{meta_path}: cache was written with other settings: {diff}; use a fresh --out directory")
        else:
            _write_json(meta_path, self.meta)
        self._done = done_keys(self.out_dir)
        files = _shard_files(self.out_dir)
        mine = [n for (r, n), kinds in files.items() if r == rank and "idx.json" in kinds]
        self._next_n = max(mine) + 1 if mine else 0
        self._resume_progress = None
        for (r, n), kinds in files.items():
            if r != rank or "idx.json" in kinds:
                continue
            if n == self._next_n and {"bin.tmp", "progress.json"} <= kinds:  # committed progress: continued
                self._resume_progress = _read_json(self.out_dir / f"{shard_stem(r, n)}.progress.json")
                continue
            for kind in kinds:  # left by a killed run of this rank and never committed
                (self.out_dir / f"{shard_stem(r, n)}.{kind}").unlink(missing_ok=True)
        self._file = None
        self.shards_written: list[str] = []
        self.n_added = 0

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the open shard stays unlisted, exactly as after a kill.
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None

    def _open_shard(self) -> None:
        if self._next_n > 99999:
            raise ShardError(f"rank {self.rank} has 100000 shards in {self.out_dir}; raise shard_bytes")
        self._stem = shard_stem(self.rank, self._next_n)
        self._tmp_path = self.out_dir / f"{self._stem}.bin.tmp"
        self._sha = hashlib.sha256()
        progress, self._resume_progress = self._resume_progress, None
        if progress is None:
            self._file = open(self._tmp_path, "wb")
            self._size = 0
            self._cols = {"keys": [], "h": [], "w": [], "offset": [], "nbytes": [], "crc32": []}
            return
        # Continue a shard a killed writer committed: bytes past the commit are dropped.
        self._file = open(self._tmp_path, "r+b")
        self._file.truncate(progress["nbytes"])
        committed = self._file.read(progress["nbytes"])
        if len(committed) != progress["nbytes"]:
            raise ShardError(f"{self._tmp_path}: {len(committed)} bytes, its progress file committed {progress['nbytes']}")
        self._sha.update(committed)
        self._size = progress["nbytes"]
        self._cols = progress["records"]

    def commit(self) -> None:
        """Make everything added so far survive a kill (the open shard's bytes and records)."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        _write_json(self.out_dir / f"{self._stem}.progress.json", {"nbytes": self._size, "records": self._cols})

    def add(self, key: str, codes) -> None:
        """Store one image's codes: an integer tensor/array [h, w, 4] with values in [0, K)."""
        if not isinstance(key, str) or not key:
            raise ShardError(f"shard keys must be non-empty strings, got {key!r}")
        if key in self._done:
            raise ShardError(f"key {key!r} is already stored in {self.out_dir}; skip keys for which `key in writer` is true")
        arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if arr.ndim != 3 or arr.shape[2] != SUBCODES or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ShardError(f"codes for key {key!r} have shape {tuple(arr.shape)}; expected [h, w, {SUBCODES}]")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ShardError(f"codes for key {key!r} have dtype {arr.dtype}; expected integer FSQ indices")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.meta["codebook_size"]:
            raise ShardError(f"codes for key {key!r} span [{lo}, {hi}], outside [0, {self.meta['codebook_size']})")
        data = np.ascontiguousarray(arr, dtype=self.dtype).tobytes()
        if self._file is None:
            self._open_shard()
        self._file.write(data)
        self._sha.update(data)
        cols = self._cols
        cols["keys"].append(key)
        cols["h"].append(int(arr.shape[0]))
        cols["w"].append(int(arr.shape[1]))
        cols["offset"].append(self._size)
        cols["nbytes"].append(len(data))
        cols["crc32"].append(zlib.crc32(data))
        self._size += len(data)
        self._done.add(key)
        self.n_added += 1
        if self._size >= self.shard_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        # The shard streams into its own .bin.tmp (not viq.io.atomic_path: it is written record by
        # record); the rename is made durable before the index that lists the shard is written.
        os.replace(self._tmp_path, self.out_dir / f"{self._stem}.bin")
        fsync_dir(self.out_dir)
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shard": f"{self._stem}.bin",
            "dtype": self.dtype.str,
            "nbytes": self._size,
            "sha256": self._sha.hexdigest(),
            "meta": self.meta,
            "records": self._cols,
        }
        _write_json(self.out_dir / f"{self._stem}.idx.json", index)  # the shard is listed from here on
        (self.out_dir / f"{self._stem}.progress.json").unlink(missing_ok=True)
        self.shards_written.append(f"{self._stem}.bin")
        self._next_n += 1

    def close(self) -> list[str]:
        """Complete the open shard (if any); returns the names of the shards this writer wrote."""
        if self._file is None and self._resume_progress is not None:  # a committed shard nothing was added to
            self._open_shard()
        if self._file is not None:
            self._finish_shard()
        return self.shards_written


def merge_manifests(out_dir: str | os.PathLike) -> dict:
    """Build manifest.json from every listed shard of every rank; refuses duplicate keys and meta drift."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.exists():
        raise ShardError(f"{meta_path} is missing: {out_dir} is not a code cache written by ShardWriter")
    meta = _read_json(meta_path)
    seen: dict[str, str] = {}
    shards = []
    for idx_path in _listed_indexes(out_dir):
        index = _read_json(idx_path)
        diff = _meta_difference(meta, index["meta"])
        if diff:
            raise ShardError(f"{idx_path}: shard written with other settings than {META_FILE}: {diff}")
        for key in index["records"]["keys"]:
            if key in seen:
                raise ShardError(f"key {key!r} is stored twice: in {seen[key]} and {index['shard']}")
            seen[key] = index["shard"]
        shards.append(
            {
                "name": index["shard"],
                "index": idx_path.name,
                "sha256": index["sha256"],
                "nbytes": index["nbytes"],
                "n_records": len(index["records"]["keys"]),
                "dtype": index["dtype"],
            }
        )
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "meta": meta,
        "n_records": len(seen),
        "nbytes": sum(s["nbytes"] for s in shards),
        "shards": shards,
    }
    _write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def _load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        raise ShardError(f"{path} is missing: run merge_manifests('{out_dir}') after extraction (or extract_codes.py finishes it)")
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')!r}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return manifest


class CodeStore:
    """Random access to cached codes by key, memory-mapped, checksummed on every read.

    expected_meta: settings the reader requires (e.g. {"levels": [...], "codebook_size": K,
    "tokenizer": name}); a cache with other values is refused with the differing key.
    """

    def __init__(self, out_dir: str | os.PathLike, expected_meta: dict | None = None, check_crc: bool = True):
        self.out_dir = Path(out_dir)
        manifest = _load_manifest(self.out_dir)
        self.meta = manifest["meta"]
        if expected_meta is not None:
            diff = _meta_difference(json.loads(json.dumps(expected_meta)), self.meta)
            if diff:
                raise ShardError(f"{self.out_dir / MANIFEST_FILE}: code cache does not match this model: {diff}")
        self.check_crc = check_crc
        self.shard_paths: list[Path] = []
        self._dtypes: list[np.dtype] = []
        cols = {"h": [], "w": [], "offset": [], "nbytes": [], "crc32": [], "shard": []}
        self._row: dict[str, int] = {}
        for shard_id, entry in enumerate(manifest["shards"]):
            path = self.out_dir / entry["name"]
            if not path.exists():
                raise ShardError(f"{path}: shard listed in {MANIFEST_FILE} is missing")
            size = path.stat().st_size
            if size < entry["nbytes"]:
                raise ShardError(f"{path}: truncated shard, {size} bytes on disk but its index needs {entry['nbytes']}")
            index = _read_json(self.out_dir / entry["index"])["records"]
            if len(index["keys"]) != entry["n_records"]:
                raise ShardError(f"{self.out_dir / entry['index']}: {len(index['keys'])} records, {MANIFEST_FILE} says {entry['n_records']}; rerun merge_manifests")
            self.shard_paths.append(path)
            self._dtypes.append(np.dtype(entry["dtype"]))
            for key in index["keys"]:
                self._row[key] = len(self._row)
            for name in ("h", "w", "offset", "nbytes", "crc32"):
                cols[name].extend(index[name])
            cols["shard"].extend([shard_id] * len(index["keys"]))
        self._h = np.asarray(cols["h"], dtype=np.int32)
        self._w = np.asarray(cols["w"], dtype=np.int32)
        self._offset = np.asarray(cols["offset"], dtype=np.int64)
        self._nbytes = np.asarray(cols["nbytes"], dtype=np.int64)
        self._crc = np.asarray(cols["crc32"], dtype=np.uint32)
        self._shard = np.asarray(cols["shard"], dtype=np.int32)
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened in each process
        return state

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def keys(self) -> list[str]:
        return list(self._row)

    def _row_of(self, key: str) -> int:
        try:
            return self._row[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the code cache {self.out_dir} ({len(self)} images)") from None

    def grid(self, key: str) -> tuple[int, int]:
        """(h, w) of an image's token grid, from the index alone."""
        row = self._row_of(key)
        return int(self._h[row]), int(self._w[row])

    def _map(self, shard_id: int) -> np.memmap:
        mm = self._maps.get(shard_id)
        if mm is None:
            mm = self._maps[shard_id] = np.memmap(self.shard_paths[shard_id], dtype=np.uint8, mode="r")
        return mm

    def get_numpy(self, key: str) -> np.ndarray:
        """Codes as stored (uint16/uint32 array [h, w, 4]), checksum verified."""
        row = self._row_of(key)
        shard_id = int(self._shard[row])
        start, n = int(self._offset[row]), int(self._nbytes[row])
        raw = self._map(shard_id)[start : start + n]
        if raw.size != n:
            raise ShardError(f"{self.shard_paths[shard_id]}: truncated shard, record {key!r} needs bytes [{start}, {start + n})")
        if self.check_crc and zlib.crc32(raw) != int(self._crc[row]):
            raise ShardError(f"{self.shard_paths[shard_id]}: checksum mismatch for key {key!r} (bytes {start}-{start + n}); the shard is corrupt, re-extract it")
        return raw.view(self._dtypes[shard_id]).reshape(int(self._h[row]), int(self._w[row]), SUBCODES)

    def get(self, key: str) -> torch.Tensor:
        """LongTensor [h, w, 4] of FSQ indices."""
        return torch.from_numpy(self.get_numpy(key).astype(np.int64))


def verify(out_dir: str | os.PathLike) -> dict:
    """Re-read the whole cache: shard sha256, every record's crc32 and value range, listing.

    Returns {"ok", "n_shards", "n_records", "nbytes", "errors": [one line each]}; it does
    not stop at the first problem so one run reports all damaged shards.
    """
    out_dir = Path(out_dir)
    errors: list[str] = []
    manifest = _load_manifest(out_dir)
    listed = {s["index"] for s in manifest["shards"]}
    for idx_path in _listed_indexes(out_dir):
        if idx_path.name not in listed:
            errors.append(f"{idx_path}: complete shard not in {MANIFEST_FILE}; rerun merge_manifests")
    codebook_size = manifest["meta"]["codebook_size"]
    n_records = 0
    for entry in manifest["shards"]:
        path = out_dir / entry["name"]
        if not path.exists():
            errors.append(f"{path}: shard listed in {MANIFEST_FILE} is missing")
            continue
        data = np.fromfile(path, dtype=np.uint8)
        if data.size != entry["nbytes"]:
            errors.append(f"{path}: {data.size} bytes on disk, index says {entry['nbytes']}")
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            errors.append(f"{path}: sha256 differs from {MANIFEST_FILE}")
        index = _read_json(out_dir / entry["index"])["records"]
        dtype = np.dtype(entry["dtype"])
        for key, h, w, off, nb, crc in zip(index["keys"], index["h"], index["w"], index["offset"], index["nbytes"], index["crc32"]):
            n_records += 1
            raw = data[off : off + nb]
            if raw.size != nb or nb != h * w * SUBCODES * dtype.itemsize:
                errors.append(f"{path}: record {key!r} is truncated or has a wrong size")
            elif zlib.crc32(raw) != crc:
                errors.append(f"{path}: checksum mismatch for key {key!r}")
            elif int(raw.view(dtype).max()) >= codebook_size:
                errors.append(f"{path}: key {key!r} holds a code >= codebook_size {codebook_size}")
    return {
        "ok": not errors,
        "n_shards": len(manifest["shards"]),
        "n_records": n_records,
        "nbytes": manifest["nbytes"],
        "errors": errors,
    }


__all__ = [
    "ShardError",
    "ShardWriter",
    "CodeStore",
    "done_keys",
    "merge_manifests",
    "verify",
    "code_dtype",
    "compression_ratio",
    "shard_stem",
]
