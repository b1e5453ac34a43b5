"""The project's error types: what a user got wrong, as opposed to a bug.

Entry points print a `UserError` as one line (the message names the file, line or key at
fault and what would be right) and exit 1; every other exception is a bug and keeps its
traceback (`VIQ_DEBUG=1` shows the traceback of user errors too). Each type also derives
from the builtin that callers caught before it existed (ValueError, FileNotFoundError), so
`except ValueError` keeps working.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """Bad input: a config value, a data file, an image, a checkpoint. One line, no traceback."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key and what would be right."""


class DataError(UserError, ValueError):
    """A data file or record is malformed; the message names the file and line / row / record."""


class MissingFileError(UserError, FileNotFoundError):
    """A path given by the user does not exist (or is not what it must be)."""


class ImageInputError(UserError, ValueError):
    """An image cannot be read or used (missing, undecodable, zero-sized, out of bounds)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or export is missing, incomplete or damaged; the message names the file."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra."""


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cli(main: Callable[[], int | None], program: str | None = None, exit_code: int = 1) -> int:
    """Run an entry point's body: a UserError becomes `program: error: <one line>` and `exit_code`.

    Any other exception propagates with its traceback: it is a bug, not bad input. `exit_code`
    is 1 except where a command documented another status for bad input before (eval.run and
    eval_reconstruction.py exit 2, as argparse does for bad arguments).
    """
    try:
        return int(main() or 0)
    except UserError as e:
        if os.environ.get("VIQ_DEBUG"):
            raise
        name = program or Path(sys.argv[0]).stem or "viq"
        print(f"{name}: error: {one_line(e)} (VIQ_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        return exit_code
