"""Resumable checkpoints: DeepSpeed state + JSON loop state, written atomically.

Layout under runs/<name>/checkpoints/:

    step_00000200/            DeepSpeed's files (model, optimizer, scheduler per rank)
    step_00000200/loop_state.json   step, loader cursor, RNG; written LAST: a tag without it
                                    is an interrupted save and is never resumed from
    latest                    the newest complete tag, replaced atomically (os.replace)

A kill during a save therefore leaves `latest` naming the previous, complete checkpoint.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / LOOP_STATE).is_file()


def save_checkpoint(engine, ckpt_dir: Path, step: int, loop_state: dict, *, rank: int, keep: int, barrier) -> Path:
    """Save DeepSpeed state, then (rank 0) the loop state and `latest`; prune old tags."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # a leftover of an interrupted save of this very step
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    barrier()
    if rank == 0:
        _atomic_write(tag_dir / LOOP_STATE, json.dumps(loop_state))
        _atomic_write(ckpt_dir / LATEST, tag)
        complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and is_complete(p))
        for old in complete[: max(0, len(complete) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return tag_dir


def find_resume(ckpt_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint tag directory to resume from: 'auto' = newest complete one (or None)."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / LATEST).is_file():  # a checkpoints/ directory
            path = path / (path / LATEST).read_text().strip()
        if not path.is_dir() or not is_complete(path):
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {LOOP_STATE} in {path})")
        return path
    if not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / LATEST
    if latest.is_file():
        candidate = ckpt_dir / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and is_complete(p))
    return complete[-1] if complete else None


def load_checkpoint(engine, tag_dir: Path) -> dict:
    """Restore DeepSpeed state from tag_dir; returns the loop state."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    return json.loads((tag_dir / LOOP_STATE).read_text())
