"""Resumable checkpoints: DeepSpeed state + JSON loop state, written atomically.

Layout under runs/<name>/checkpoints/:

    step_00000200/            DeepSpeed's files (model, optimizer, scheduler per rank)
    step_00000200/loop_state.json   step, loader cursor, RNG, and the size and sha256 of every
                                    other file of the tag (its own checksum inside); written LAST:
                                    a tag without it is an interrupted save, never resumed from
    latest                    the newest complete tag, replaced atomically (os.replace)

A kill during a save therefore leaves `latest` naming the previous, complete checkpoint.
`--resume auto` verifies every file before loading and falls back to the newest intact tag,
warning about each damaged one; a save that fails (a full disk) removes its partial tag.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from viq.errors import CheckpointError, UserError, one_line
from viq.io import atomic_write, atomic_write_json, read_json

log = logging.getLogger(__name__)

LOOP_STATE = "loop_state.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state() -> dict:
    state = {
        "torch": _encode_rng(torch.get_rng_state()),
        "numpy": _np_state_to_json(np.random.get_state()),
        "python": _py_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available():  # dropout on the GPU (e.g. model.lora.dropout) draws from the device's generator
        state["cuda"] = _encode_rng(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_decode_rng(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode_rng(state["cuda"]))
    np.random.set_state(_np_state_from_json(state["numpy"]))
    random.setstate(_py_state_from_json(state["python"]))


def _np_state_to_json(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_state_from_json(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / LOOP_STATE).is_file()


def gather_objects(obj) -> list:
    """obj from every rank (one process: [obj])."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _state_checksum(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _checkpoint_files(tag_dir: Path) -> list[str]:
    return sorted(p.name for p in tag_dir.iterdir() if p.is_file() and p.name != LOOP_STATE and ".tmp" not in p.name)


def _digests(tag_dir: Path, names: list[str]) -> dict:
    """{name: {bytes, sha256}} of the files, hashed by all ranks together (each a share)."""
    rank, world = _rank_world()
    mine = {n: {"bytes": (tag_dir / n).stat().st_size, "sha256": _sha256(tag_dir / n)} for n in names[rank::world]}
    merged: dict = {}
    for part in gather_objects(mine):
        merged.update(part)
    return merged


def _disk_full(error: BaseException, directory: Path, needed_bytes: int) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain, or a torch writer failure with the disk now nearly full
    (torch.save reports a full disk as 'file write failed' / 'iostream error', without errno)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < max(needed_bytes, 1 << 20)
    except OSError:
        return False


def save_checkpoint(engine, ckpt_dir: Path, step: int, loop_state: dict, *, rank: int, keep: int, barrier,
                    needed_bytes: int = 0) -> Path:
    """Save DeepSpeed state, checksum every file, then (rank 0) the loop state and `latest`; prune old tags.

    A save that fails on any rank (a full disk) removes the partial tag on rank 0 and raises the
    same CheckpointError on every rank; `latest` keeps naming the previous checkpoint.
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # a leftover of an interrupted save of this very step
        shutil.rmtree(tag_dir)
    barrier()
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as e:
        failure = e
    _raise_if_any_failed(failure, tag_dir, ckpt_dir, rank, needed_bytes)
    state = dict(loop_state, files=_digests(tag_dir, _checkpoint_files(tag_dir)))
    state["checksum"] = _state_checksum(state)
    failure = None
    if rank == 0:
        try:
            atomic_write_json(tag_dir / LOOP_STATE, state)
            atomic_write(ckpt_dir / LATEST, tag)
        except OSError as e:
            failure = e
    _raise_if_any_failed(failure, tag_dir, ckpt_dir, rank, needed_bytes)
    if rank == 0:
        complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and is_complete(p))
        for old in complete[: max(0, len(complete) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return tag_dir


def _raise_if_any_failed(failure, tag_dir: Path, ckpt_dir: Path, rank: int, needed_bytes: int) -> None:
    """Every rank learns whether any rank failed (one all-gather), so that none waits in a barrier
    for a rank that gave up."""
    reports = gather_objects(None if failure is None else
                          ("disk full" if _disk_full(failure, ckpt_dir, needed_bytes) else one_line(failure)))
    bad = [(r, text) for r, text in enumerate(reports) if text is not None]
    if not bad:
        return
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    latest = ckpt_dir / LATEST
    kept = f"latest is still {latest.read_text().strip()}" if latest.is_file() else "no earlier checkpoint"
    if any(text == "disk full" for _, text in bad):
        raise CheckpointError(f"no space left on device in {ckpt_dir} while saving {tag_dir.name} "
                              f"(rank {bad[0][0]}); the partial {tag_dir.name} was removed and {kept}; free space "
                              "(or lower trainer.keep_checkpoints) and rerun with --resume auto") from failure
    if failure is not None:
        raise failure  # not a full disk: a bug or an I/O fault, with its traceback
    raise CheckpointError(f"rank {bad[0][0]} failed to save {tag_dir}: {bad[0][1]}; {kept}")


def verify_checkpoint(tag_dir: Path) -> list[str]:
    """What is wrong with a checkpoint tag directory (empty: intact). Every rank must call it:
    the files are hashed by all ranks together, and every rank gets the same answer."""
    path = tag_dir / LOOP_STATE
    if not path.is_file():
        return [f"{path} is missing (the save was interrupted or the file was deleted)"]
    try:
        state = read_json(path, what="loop state")
    except UserError as e:
        return [f"{one_line(e)} (the file is damaged or was cut short)"]
    if not isinstance(state, dict) or "step" not in state:
        return [f"{path}: not a loop state (no 'step')"]
    if "checksum" not in state:  # saved before checksums existed: the files are not verifiable
        log.warning(f"{tag_dir}: saved without checksums; its files are not verified")
        return []
    if state["checksum"] != _state_checksum(state):
        return [f"{path}: checksum mismatch (the file was changed or damaged)"]
    expected = state["files"]
    names = sorted(expected)
    present = [n for n in names if (tag_dir / n).is_file()]
    problems = [f"{tag_dir / n} is missing" for n in names if n not in present]
    sized = [n for n in present if (tag_dir / n).stat().st_size == expected[n]["bytes"]]
    problems += [f"{tag_dir / n} is {(tag_dir / n).stat().st_size} bytes, expected {expected[n]['bytes']} (cut short or "
                 "overwritten)" for n in present if n not in sized]
    actual = _digests(tag_dir, sized)
    problems += [f"{tag_dir / n}: sha256 mismatch (damaged)" for n in sized if actual[n]["sha256"] != expected[n]["sha256"]]
    return problems


def find_resume(ckpt_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint tag directory to resume from.

    'auto': the newest intact checkpoint (or None); each newer one that is incomplete or damaged
    is skipped with one warning naming the file and what is wrong. A PATH (a tag directory or a
    checkpoints/ directory) must be intact: otherwise a one-line CheckpointError.
    Every rank must call it (verification is collective).
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / LATEST).is_file():  # a checkpoints/ directory
            path = path / (path / LATEST).read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: {path} is not a checkpoint directory")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"--resume {resume}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                  + "; resume from an intact checkpoint or use --resume auto")
        return path
    if not ckpt_dir.is_dir():
        return None
    for candidate in sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True):
        problems = verify_checkpoint(candidate)
        if not problems:
            return candidate
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warning(f"resume: skipping {candidate.name}: {problems[0]}{more}")
    return None


def load_checkpoint(engine, tag_dir: Path) -> dict:
    """Restore DeepSpeed state from tag_dir (verified by find_resume); returns the loop state."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    return read_json(tag_dir / LOOP_STATE, what="loop state")
