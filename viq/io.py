"""File I/O every layer shares: atomic writes and JSON / JSON Lines / YAML reads with file:line errors.

An atomic write goes to a temporary file in the target's folder, is flushed and fsynced,
replaces the target with `os.replace`, and then the folder itself is fsynced so that the
rename survives a power cut. A reader of the target sees the old file or the new one, never
a mix; a crash leaves at most a stray `*.tmp.<pid>` file.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from viq.errors import ConfigError, DataError, MissingFileError


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (the rename of an entry in it is then durable); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on normal exit it replaces `path` durably.

    For writers that need a file name (torch.save, safetensors' save_file). On an exception the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Any], None], *, encoding: str = "utf-8") -> Path:
    """Write `data` (text, bytes, or a callable given the open binary file) to `path` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode(encoding))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
    return path


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = None, sort_keys: bool = False) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + ("\n" if indent is not None else ""))


def read_text(path: str | os.PathLike, *, what: str = "file") -> str:
    """UTF-8 text of a file; undecodable bytes name the file, line and byte offset."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def read_json(path: str | os.PathLike, *, what: str = "JSON file"):
    """The parsed JSON of a file; malformed or truncated JSON names `file:line:column`."""
    path = Path(path)
    text = read_text(path, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def iter_jsonl(path: str | os.PathLike, *, what: str = "JSON Lines file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; errors name `file:line`."""
    path = Path(path)
    text = read_text(path, what=what)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None


def read_jsonl_objects(path: str | os.PathLike, *, what: str = "JSON Lines file") -> list[tuple[int, dict]]:
    """(line number, object) pairs of a JSON Lines file whose every line must be a JSON object."""
    rows = []
    for number, value in iter_jsonl(path, what=what):
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        rows.append((number, value))
    return rows


def read_yaml(path: str | os.PathLike, *, what: str = "YAML file"):
    """The parsed YAML of a config-like file (empty file: None); a syntax error names `file:line`."""
    import yaml

    try:
        return yaml.safe_load(read_text(path, what=what))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
