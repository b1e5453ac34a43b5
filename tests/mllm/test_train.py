"""End-to-end training through the real entry point (deepspeed launcher, CPU, gloo)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mllm.engine import free_port
from tests.fixtures import make_colour_dataset

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
FAST = ["--set", "data.max_seq_len=1024", "--set", "data.buffer_size=16", "--set", "trainer.log_every=1",
        "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false", "--set", "optim.warmup_steps=2"]


def launch(args, *, ranks=1, timeout=600, check=True, env_extra=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1" if ranks > 1 else "2")
    env.update(env_extra or {})
    port = str(free_port())
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", port, "scripts/train_mllm.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return make_colour_dataset(root, n=30)


@pytest.mark.slow
def test_train_exports_and_loss_falls(colour_data, tmp_path):
    run = tmp_path / "run"
    launch(["--set", f"data.train={colour_data}", "--run-dir", str(run), "--max-steps", "8", *FAST])
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "samples", "packing_efficiency"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0 < rows[0]["packing_efficiency"] <= 1
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == "step_00000008"
    from mllm.export import load_export, load_viq

    model, tokenizer, vocab = load_export(run / "hf")
    assert vocab.code_base == 151936 and tokenizer is not None and len(tokenizer) == 151665
    assert load_viq(run / "hf").codebook_size == vocab.codebook_size

    # the trained export, evaluated end to end by the harness on the synthetic validation TSVs
    from data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "synth", 30, seed=1, val_fraction=0.5)
    proc = subprocess.run(
        [sys.executable, "-m", "eval.run", "--model", str(run / "hf"), "--benchmarks", "SYNTH_SHAPES,SYNTH_CHART",
         "--data-root", str(tmp_path / "synth" / "vlmeval"), "--out", str(tmp_path / "eval"), "--limit", "4",
         "--max-new-tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "run" in json.dumps(report) and (tmp_path / "eval" / "report.md").read_text().count("SYNTH_SHAPES") >= 2
    scores = json.loads(proc.stdout.strip().splitlines()[-1])["scores"]
    assert 0 <= scores["SYNTH_SHAPES"]["Overall"] <= 1 and 0 <= scores["SYNTH_CHART"]["Overall"] <= 100


@pytest.mark.slow
def test_resume_after_kill_continues_with_the_exact_next_batch(colour_data, tmp_path):
    common = ["--set", f"data.train={colour_data}", *FAST, "--set", "trainer.export=false", "--set", "optim.schedule_steps=6"]
    straight = tmp_path / "straight"
    launch([*common, "--run-dir", str(straight), "--max-steps", "6"])

    killed = tmp_path / "killed"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    port = str(free_port())
    proc = subprocess.Popen(
        [DEEPSPEED, "--num_gpus", "1", "--master_port", port, "scripts/train_mllm.py", *common,
         "--run-dir", str(killed), "--max-steps", "60", "--save-every", "3"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text() == "step_00000003"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher tree, mid-training
    proc.wait()
    assert latest.read_text() == "step_00000003"
    launch([*common, "--run-dir", str(killed), "--max-steps", "6", "--resume", "auto"])
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["data_fingerprint"] == rb["data_fingerprint"], (ra["step"], ra, rb)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-6), ra["step"]
        assert ra["samples"] == rb["samples"] and ra["tokens"] == rb["tokens"]


def test_unknown_config_key_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train_mllm.py", "--set", "optim.lrr=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'optim.lrr'" in err[0] and "valid keys under optim: " in err[0]


def test_bad_yaml_and_value_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  llm: tiny\n data: [\n")
    proc = subprocess.run([sys.executable, "scripts/train_mllm.py", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{bad}:" in proc.stderr and "invalid YAML" in proc.stderr
    proc = subprocess.run([sys.executable, "scripts/train_mllm.py", "--set", "vision.source=pixels"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "config key 'vision.source' is 'pixels'; valid values: codes, online" in proc.stderr


@pytest.mark.slow
def test_loss_is_normalised_by_the_global_supervised_count(colour_data, tmp_path):
    """Two micro-batches accumulated == the same two packs in one micro-batch: only a loss
    divided by the supervised tokens of the whole step (not per micro-batch) gives that."""
    # one buffer holds the whole data set, so both runs pack and order the same packs
    common = ["--set", f"data.train={colour_data}", *FAST, "--set", "trainer.export=false", "--max-steps", "3",
              "--set", "data.max_seq_len=512", "--set", "data.buffer_size=64"]
    accum = tmp_path / "accum"
    launch([*common, "--run-dir", str(accum), "--set", "trainer.grad_accum=2"])
    packed = tmp_path / "packed"
    launch([*common, "--run-dir", str(packed), "--set", "data.micro_batch_packs=2"])
    a, b = metrics(accum), metrics(packed)
    for ra, rb in zip(a, b):
        assert ra["data_fingerprint"] == rb["data_fingerprint"] and ra["supervised_tokens"] == rb["supervised_tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]


@pytest.mark.slow
def test_non_finite_loss_stops_or_is_skipped(colour_data, tmp_path):
    common = ["--set", f"data.train={colour_data}", *FAST, "--set", "trainer.export=false", "--max-steps", "4",
              "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0", "--set", "optim.grad_clip=0"]
    proc = launch([*common, "--run-dir", str(tmp_path / "stop")], check=False)
    assert proc.returncode != 0
    assert "train_mllm: error: non-finite loss at step 2" in proc.stderr and "trainer.nonfinite=skip" in proc.stderr
    launch([*common, "--run-dir", str(tmp_path / "skip"), "--set", "trainer.nonfinite=skip"])
    rows = metrics(tmp_path / "skip")
    assert rows[-1]["skipped_steps"] == 3 and rows[0]["loss"] == rows[0]["loss"]  # step 1 finite, 2-4 skipped


@pytest.mark.slow
def test_online_vision_source_trains_through_the_launcher(colour_data, tmp_path):
    run = tmp_path / "online"
    launch(["--set", f"data.train={colour_data}", *FAST, "--set", "vision.source=online", "--set", "trainer.export=false",
            "--run-dir", str(run), "--max-steps", "3"])
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)


@pytest.mark.slow
def test_zero3_does_not_hang_when_a_rank_has_no_image(tmp_path):
    """Small packs over a half text-only data set: some steps give one rank no image at all,
    which hangs ZeRO-3 unless every rank runs the same modules (LLaMA-Factory #5714)."""
    data = make_colour_dataset(tmp_path / "mixed", n=24, text_only_every=2)
    run = tmp_path / "z3mixed"
    launch(["--set", f"data.train={data}", *FAST, "--set", "trainer.zero_stage=3", "--set", "data.max_seq_len=160",
            "--set", "data.buffer_size=4", "--set", "trainer.export=false", "--run-dir", str(run), "--max-steps", "6"],
           ranks=2, timeout=300)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
