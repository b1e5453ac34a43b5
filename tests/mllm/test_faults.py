"""Faults injected on purpose through the real entry point (deepspeed launcher, CPU, gloo):
preemption signals, a dead launcher, damaged checkpoints, a full disk, two runs in one directory.

How each fault is injected:
- SIGTERM: os.kill on one rank's trainer process (found under the launcher with psutil), or on
  the `deepspeed` runner alone (its death is what the trainer must notice).
- damaged checkpoints: files of saved tags truncated, one byte's low bit flipped, loop_state.json
  deleted or cut short, on disk, between runs.
- full disk: the run's checkpoints/ directory is a 200 MiB tmpfs mounted inside a user + mount
  namespace (`unshare -rm`): the first checkpoint (151 MiB) fits, the second hits a real ENOSPC.
- run-directory lock: a second entry-point run into the directory of a live one; a stale lock is
  the holder record a killed run leaves (its flock died with it), written before a run.
- empty supervision: a record whose question alone is longer than data.max_seq_len.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mllm.engine import free_port
from tests.fixtures import make_colour_dataset
from tests.mllm.test_train import DEEPSPEED, FAST, REPO, metrics

EXIT_STOPPED = 75


def _env(ranks: int) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1" if ranks > 1 else "2")
    env.pop("VIQ_DEBUG", None)
    return env


def _command(args, ranks):
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "scripts/train_mllm.py", *args]


def run(args, *, ranks=1, timeout=600):
    return subprocess.run(_command(args, ranks), cwd=REPO, env=_env(ranks), capture_output=True, text=True, timeout=timeout)


def start(args, *, ranks=1, log: Path):
    fh = open(log, "w")
    return subprocess.Popen(_command(args, ranks), cwd=REPO, env=_env(ranks), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_step(run_dir: Path, proc, log: Path, step: int = 1, timeout: float = 300) -> None:
    path, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line.strip()):
            return
        assert proc.poll() is None, f"the run exited early with {proc.returncode}: {log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError("no step logged in time")


def trainers(proc) -> dict[int, psutil.Process]:
    """{local rank: trainer process} under a launcher."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        cmd = child.cmdline()
        if any(part.endswith("train_mllm.py") for part in cmd):
            found[int(child.environ().get("LOCAL_RANK", "0"))] = child
    return found


def assert_same_losses(reference: list[dict], rows: list[dict], steps) -> None:
    by_step = {r["step"]: r for r in rows}
    for ref in reference:
        if ref["step"] in steps:
            row = by_step[ref["step"]]
            assert row["data_fingerprint"] == ref["data_fingerprint"], ref["step"]
            assert row["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6), ref["step"]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=30)


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory, colour_data):
    """A straight 2-rank run of 6 steps with a checkpoint after every step (the last 5 kept)."""
    root = tmp_path_factory.mktemp("faults")
    data = colour_data
    common = ["--set", f"data.train={data}", *FAST, "--set", "trainer.export=false", "--set", "optim.schedule_steps=6",
              "--set", "trainer.keep_checkpoints=5", "--save-every", "1"]
    straight = root / "straight"
    proc = run([*common, "--run-dir", str(straight), "--max-steps", "6"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "data": data, "common": common, "straight": straight, "reference": metrics(straight)}


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_that_step_and_resume_continues_exactly(two_rank, tmp_path):
    run_dir = tmp_path / "preempted"
    proc = start([*two_rank["common"], "--run-dir", str(run_dir), "--max-steps", "60"], ranks=2, log=tmp_path / "log")
    wait_for_step(run_dir, proc, tmp_path / "log")
    ranks = trainers(proc)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1].pid, signal.SIGTERM)  # only rank 1 sees it: rank 0 must learn it at the step boundary
    assert proc.wait(timeout=300) == EXIT_STOPPED
    out = (tmp_path / "log").read_text()
    assert "SIGTERM: finishing this step, saving a checkpoint" in out and "Traceback" not in out
    stopped = metrics(run_dir)[-1]["step"]
    assert 1 < stopped < 6, stopped
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert f"[train] stopped at step {stopped} (SIGTERM" in out or f"[train] stopped at step {stopped} (a signal" in out
    assert not any(p.is_running() for p in ranks.values())
    assert (run_dir / "run.lock").read_text() == ""  # released on the way out

    resumed = run([*two_rank["common"], "--run-dir", str(run_dir), "--max-steps", "6", "--resume", "auto"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in resumed.stdout + resumed.stderr
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_same_losses(two_rank["reference"], rows, range(1, 7))


@pytest.mark.slow
def test_damaged_checkpoints_are_named_and_resume_falls_back_to_the_newest_intact_one(two_rank, tmp_path):
    straight = two_rank["straight"]
    run_dir = tmp_path / "damaged"
    shutil.copytree(straight, run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{i:08d}" for i in range(2, 7)]
    model6 = ckpts / "step_00000006" / "mp_rank_00_model_states.pt"
    half, odd = divmod(model6.stat().st_size, 2)
    os.truncate(model6, half)
    optim5 = ckpts / "step_00000005" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    raw = bytearray(optim5.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one low bit: the file still unpickles, the numbers are wrong
    optim5.write_bytes(bytes(raw))
    (ckpts / "step_00000004" / "loop_state.json").unlink()
    loop3 = ckpts / "step_00000003" / "loop_state.json"
    loop3.write_text(loop3.read_text()[:500])

    # --resume PATH to a damaged tag: one line naming the file (and no model is built first)
    env = _env(1)
    proc = subprocess.run([sys.executable, "scripts/train_mllm.py", "--run-dir", str(tmp_path / "other"), "--resume",
                           str(ckpts / "step_00000005")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{optim5}: sha256 mismatch (damaged)" in lines[0], lines

    # what a SIGKILLed run leaves: its holder record (the kernel dropped its flock with the process)
    (run_dir / "run.lock").write_text(json.dumps({"host": "node7", "pid": 4242, "started": "2026-12-01T00:00:00Z"}))
    proc = run([*two_rank["common"], "--run-dir", str(run_dir), "--max-steps", "6", "--resume", "auto"], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "taking over a stale lock (host node7, pid 4242, started 2026-12-01T00:00:00Z is no longer running)" in log
    assert f"skipping step_00000006: {model6} is {half} bytes, expected {2 * half + odd} (cut short or overwritten)" in log, log[-4000:]
    assert f"skipping step_00000005: {optim5}: sha256 mismatch (damaged)" in log
    assert f"skipping step_00000004: {ckpts / 'step_00000004' / 'loop_state.json'} is missing" in log
    assert f"skipping step_00000003: {loop3}:1:" in log and "invalid JSON" in log
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in log
    assert_same_losses(two_rank["reference"], metrics(run_dir), range(3, 7))


@pytest.mark.slow
def test_launcher_death_stops_and_saves_and_a_live_run_directory_is_refused(colour_data, tmp_path):
    run_dir = tmp_path / "orphan"
    # One more record whose question alone is longer than data.max_seq_len: cut to 1024 tokens it
    # would keep no supervised token (a step on nothing, loss NaN); it must be dropped and counted.
    data = tmp_path / "train.jsonl"
    long_question = " ".join(f"word{i}" for i in range(1500))
    data.write_text(colour_data.read_text() + json.dumps({"id": "long", "conversations": [
        {"from": "human", "value": long_question}, {"from": "gpt", "value": "red"}]}) + "\n")
    common = ["--set", f"data.train={data}", "--set", f"data.image_root={colour_data.parent}", *FAST,
              "--set", "trainer.export=false"]
    proc = start([*common, "--run-dir", str(run_dir), "--max-steps", "60"], ranks=1, log=tmp_path / "log")
    wait_for_step(run_dir, proc, tmp_path / "log")
    trainer = trainers(proc)[0]
    launcher = psutil.Process(proc.pid).children()[0]  # DeepSpeed's per-node launch.py

    second = subprocess.run([sys.executable, "scripts/train_mllm.py", "--run-dir", str(run_dir)], cwd=REPO, env=_env(1),
                            capture_output=True, text=True, timeout=300)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, second.stderr[-3000:]
    assert f"{run_dir} is in use by another run (host {socket.gethostname()}, pid {trainer.pid}, started " in lines[0]

    proc.send_signal(signal.SIGTERM)  # the `deepspeed` runner alone: it dies without forwarding anything
    proc.wait(timeout=60)
    trainer.wait(timeout=300)
    out = (tmp_path / "log").read_text()
    assert "the deepspeed runner (pid" in out and "exited: saving a checkpoint" in out, out[-3000:]
    rows = metrics(run_dir)
    stopped = rows[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert "1 dropped because the cut left no supervised token" in out
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in rows)
    launcher.wait(timeout=60)  # no orphans: the per-node launcher follows its trainer out


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_latest(colour_data, tmp_path):
    if not _can_mount_tmpfs():
        pytest.skip("needs user + mount namespaces (unshare -rm) to mount a small tmpfs")
    run_dir = tmp_path / "full"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    args = [*_command(["--set", f"data.train={colour_data}", *FAST, "--set", "trainer.export=false",
                       "--run-dir", str(run_dir), "--max-steps", "4", "--save-every", "2"], 1)]
    script = (f"mount -t tmpfs -o size=200m none {ckpts} && {' '.join(args)}; echo exit=$?; "
              f"cat {ckpts}/latest; echo; ls {ckpts}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=_env(1), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert "exit=1" in out, out[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "train_mllm: error:" in line]
    assert errors == [f"train_mllm: error: no space left on device in {ckpts} while saving step_00000004 (rank 0); the "
                      "partial step_00000004 was removed and latest is still step_00000002; free space (or lower "
                      "trainer.keep_checkpoints) and rerun with --resume auto (VIQ_DEBUG=1 shows the traceback)"], out[-4000:]
    listing = proc.stdout.split("exit=1", 1)[1].split()
    assert listing[0] == "step_00000002" and "step_00000004" not in listing, listing
    assert "Traceback" not in proc.stderr


def test_signals_close_together_are_one_request_and_a_later_second_one_exits_at_once():
    """Ctrl-C reaches the trainer twice at once (the terminal's SIGINT, the launcher's forwarded
    SIGTERM): one graceful request. A second signal after the coalescing window exits 128 + N."""
    code = ("import os, signal, time\n"
            "from mllm.faults import GracefulStop, SAME_REQUEST_S\n"
            "stop = GracefulStop().install()\n"
            "assert not stop.requested()\n"
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert stop.requested() and stop.reason == 'SIGINT', stop.reason\n"
            "print('still running', flush=True)\n"
            "time.sleep(SAME_REQUEST_S + 0.2)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stdout == "still running\n"
    assert proc.stderr.splitlines() == [
        "[train] SIGINT: finishing this step, saving a checkpoint, then exiting with status 75 (a second signal exits "
        "at once without saving)",
        "[train] second SIGTERM during the graceful stop: exiting now without a checkpoint"]


def test_free_space_below_one_checkpoint_is_warned_at_start(tmp_path, caplog):
    from mllm.faults import check_free_space

    free = shutil.disk_usage(tmp_path).free
    with caplog.at_level("WARNING"):
        check_free_space(tmp_path / "checkpoints", free // 2)
        assert not caplog.records
        check_free_space(tmp_path / "checkpoints", free * 2)
    assert len(caplog.records) == 1 and "a checkpoint needs about" in caplog.records[0].getMessage()
    assert "the next save will fail" in caplog.records[0].getMessage()
