"""One logging set-up for the whole project: library code logs, entry points print.

Library modules use `logging.getLogger(__name__)`; `setup_logging(rank)` (called once by each
entry point) attaches one handler to the project's package loggers: INFO and above from rank
0, warnings and errors from every rank (prefixed with the rank). Messages look like
`[mllm.trainer] saved checkpoint ...`. Third-party loggers (DeepSpeed, transformers) stay at
WARNING.
"""
from __future__ import annotations

import logging
import sys

PACKAGES = ("viq", "data", "mllm", "eval")
_HANDLER_NAME = "viq-mllm"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int = 0, level: int = logging.INFO, stream=None) -> None:
    """Idempotent: a second call replaces the handler (e.g. once the rank is known)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.set_name(_HANDLER_NAME)
    prefix = "" if rank == 0 else f"rank {rank} "
    handler.setFormatter(logging.Formatter(f"[%(name)s] {prefix}%(message)s"))
    handler.addFilter(_RankFilter(rank))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
