"""What a training run does when the cluster around it fails: preemption, a dead launcher,
a second run into the same directory, a disk too small for the next checkpoint.

Exit statuses of `scripts/train_mllm.py` (documented in docs/training.md, "Faults and recovery"):

    0    finished trainer.max_steps
    1    bad input (config, data, checkpoint): one line on stderr
    75   stopped early on SIGTERM / SIGINT or because the launcher died, after saving a checkpoint
         (EX_TEMPFAIL: rerun with `--resume auto` to continue)
    128+N  a second signal N during the graceful stop: exited at once, without finishing the save
           (130 for SIGINT, 143 for SIGTERM)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from viq.errors import UserError

log = logging.getLogger(__name__)

EXIT_STOPPED = 75
# Signals this close together are one request: a scheduler signals the whole process tree, and
# DeepSpeed's per-node launcher forwards its own SIGTERM / SIGINT to the trainer as SIGTERM.
SAME_REQUEST_S = 2.0
_LAUNCHER_MODULE = "deepspeed.launcher.launch"


class GracefulStop:
    """Turns SIGTERM / SIGINT into a request to stop at the next step boundary, and notices
    when the launcher that started this process has died.

    Only some ranks may see a signal (a node-local preemption): the trainer sums `requested()`
    over ranks at the step boundary, so that every rank saves the same step and stops.
    A second signal, more than SAME_REQUEST_S after the first, exits at once (128 + signal).
    """

    def __init__(self):
        self.reason: str | None = None
        self._first_at = 0.0
        self._previous: dict = {}
        self._watched = _launcher_processes()

    def install(self) -> "GracefulStop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.reason is None:
            self.reason, self._first_at = name, now
            _say(f"[train] {name}: finishing this step, saving a checkpoint, then exiting with status {EXIT_STOPPED} "
                 f"(a second signal exits at once without saving)")
        elif now - self._first_at > SAME_REQUEST_S:
            _say(f"[train] second {name} during the graceful stop: exiting now without a checkpoint")
            os._exit(128 + signum)

    def requested(self) -> bool:
        """A signal arrived, or a launcher process above this one has exited (checked each step)."""
        if self.reason is None:
            for proc, what in self._watched:
                if not _alive(proc):
                    self.reason = f"{what} (pid {proc.pid}) exited"
                    _say(f"[train] {self.reason}: saving a checkpoint, then exiting with status {EXIT_STOPPED}")
                    break
        return self.reason is not None


def _say(text: str) -> None:
    # os.write: safe inside a signal handler (no buffered-stream reentrancy).
    os.write(2, (text + "\n").encode())


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _launcher_processes() -> list:
    """The processes whose death must stop training: DeepSpeed's per-node launcher and the
    `deepspeed` runner above it. The runner installs no signal handler on a single node, so a
    SIGTERM to it alone would leave the per-node launcher and this trainer running as orphans."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if _LAUNCHER_MODULE not in " ".join(parent.cmdline()):
            return []  # run directly (python scripts/train_mllm.py): a signal is the only stop
        watched = [(parent, "the DeepSpeed launcher")]
        runner = parent.parent()
        if runner is not None and runner.pid != 1:
            watched.append((runner, "the deepspeed runner"))
        return watched
    except psutil.Error:
        return []


class RunDirectoryBusy(UserError, RuntimeError):
    """Another live run holds the run directory."""


_HELD_HERE: set[str] = set()  # run.lock paths this process holds (flock conflicts across file descriptors)


class RunLock:
    """`<run_dir>/run.lock`: one run per run directory.

    The lock is an flock on the file, held for the life of the process; the kernel drops it
    when the process dies, however it dies, so a lock file left by a killed run is stale by
    construction and is taken over (the holder it names is logged). The file's text names the
    holder (host, pid, start time) for the refusal message. flock works across hosts on NFSv4
    (the Linux client maps it to a POSIX lock).
    """

    NAME = "run.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD_HERE:  # a later trainer of this same process (benchmark arms, lever sweeps)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirectoryBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it, stop it, "
                                   "or choose another --run-dir") from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            log.warning(f"{self.path}: taking over a stale lock ({_describe(previous)} is no longer running)")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        _HELD_HERE.add(key)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly, nothing stale to report
            os.close(self._fd)
            self._fd = None
            _HELD_HERE.discard(str(self.path.resolve()))


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Warn at start when the checkpoint directory's file system cannot hold one more checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        log.warning(f"{directory}: {free / 2**30:.2f} GiB free, a checkpoint needs about {needed_bytes / 2**30:.2f} GiB: "
                    "the next save will fail; free space or set trainer.runs_dir elsewhere")
