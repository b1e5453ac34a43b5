"""The run planner: memory against measured peaks, steps against the loader's own plan, refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllm.config import TrainConfig, load_config
from mllm.planner import GIB, BENCH_JSON, estimate_memory, model_dims, plan_run, steps_per_epoch

REPO = Path(__file__).resolve().parents[2]


def bench_config(point: dict) -> TrainConfig:
    s = point["settings"]
    cfg = TrainConfig()
    cfg.model.llm, cfg.model.viq = point["llm"], "viq-1.3b"
    cfg.data.max_seq_len, cfg.data.micro_batch_packs = point["capacity"], s["micro_batch_packs"]
    cfg.model.gradient_checkpointing, cfg.model.loss_impl = s["gradient_checkpointing"], s["loss_impl"]
    cfg.model.compile_layers, cfg.trainer.zero_stage = s["compile_layers"], s["zero_stage"]
    return cfg


def test_memory_estimate_within_15_percent_of_every_h200_row():
    """Each cached-code row of docs/benchmarks.md (one H200, ZeRO-1, bf16): the planner's peak
    against torch.cuda.max_memory_allocated of that run; the parameter count exactly."""
    bench = json.loads(BENCH_JSON.read_text())
    rows = bench["lever_sweep"] + bench["points"]
    assert len(rows) >= 8
    for point in rows:
        measured = point["arms"]["codes"]
        cfg = bench_config(point)
        assert model_dims(cfg).params == measured["trainable_params"]
        plan = estimate_memory(cfg, point["world_size"])
        ratio = plan.peak / GIB / measured["peak_memory_gib"]
        assert 0.85 <= ratio <= 1.15, (point.get("lever"), point["llm"], ratio)


def test_zero_stages_divide_what_they_shard():
    cfg = load_config("configs/mllm/qwen2.5-7b-16k.yaml")
    one, eight = estimate_memory(cfg, 1).terms, estimate_memory(cfg, 8).terms
    for key in ("parameters", "gradients", "optimizer"):
        assert eight[key] == pytest.approx(one[key] / 8)
    assert eight["activations"] == one["activations"]
    cfg.trainer.zero_stage = 1  # ZeRO-1 shards only the optimizer state
    z1 = estimate_memory(cfg, 8).terms
    assert z1["parameters"] == pytest.approx(one["parameters"]) and z1["optimizer"] == pytest.approx(one["optimizer"] / 8)
    cfg.trainer.zero_stage, cfg.trainer.deepspeed_config = 3, "configs/deepspeed/zero3_offload.json"
    offload = estimate_memory(cfg, 8)
    assert offload.terms["optimizer"] == 0 and offload.host_per_rank == pytest.approx(16 * model_dims(cfg).params / 8)


def test_steps_per_epoch_are_the_loaders_own():
    from data.loader import PackedLoader

    cfg = TrainConfig()
    cfg.data.max_seq_len, cfg.data.buffer_size, cfg.data.micro_batch_packs, cfg.trainer.grad_accum = 4096, 64, 2, 2
    lengths = np.random.default_rng(0).integers(50, 3000, 900)

    class Lengths:
        def __len__(self):
            return len(lengths)

        def length(self, i):
            return int(lengths[i])

    got = steps_per_epoch(lengths, cfg, world=4)
    loader = PackedLoader(Lengths(), 4096, buffer_size=64, seed=0, rank=3, world_size=4, micro_batch_packs=2)
    assert got["steps_per_epoch"] == loader.steps_per_epoch // 2
    total = int(np.minimum(lengths, 4096).sum())  # less the tail packs that fill no group of 4 ranks x 2 packs
    assert 0.97 * total <= got["tokens"] <= total
    assert 0.9 < got["packing_efficiency"] <= 1.0


def test_plan_run_cli_fits_refuses_and_names_the_largest_term():
    def run(*args):
        return subprocess.run([sys.executable, "scripts/plan_run.py", "--samples", "20000", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    ok = run("--config", "configs/mllm/qwen2.5-72b-16k.yaml", "--gpus", "64", "--gpu", "h100-80g", "--nodes", "8")
    assert ok.returncode == 0, ok.stderr
    assert "fits" in ok.stdout and "steps per epoch" in ok.stdout and "h per epoch" in ok.stdout
    no = run("--config", "configs/mllm/qwen2.5-72b-16k.yaml", "--gpus", "8", "--gpu", "h100-80g")
    assert no.returncode == 1
    err = no.stderr.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "largest term: optimizer" in err[0]
    offload = run("--config", "configs/mllm/qwen2.5-72b-16k.yaml", "--gpus", "8", "--gpu", "h100-80g",
                  "--set", "trainer.deepspeed_config=configs/deepspeed/zero3_offload.json")
    assert offload.returncode == 0 and "host memory per node" in offload.stdout, offload.stderr
    bad = run("--gpus", "8", "--gpu", "h100-81g")
    assert bad.returncode == 1 and "unknown GPU 'h100-81g'; known: h100-80g" in bad.stderr


def test_plan_uses_measured_throughput():
    cfg = load_config("configs/mllm/qwen2.5-1.5b-16k.yaml")
    plan = plan_run(cfg, 1, "h200-141g", np.full(1000, 8000), "test")
    ref = plan["reference"]
    assert ref["llm"] == "qwen2.5-1.5b" and ref["context"] == 16384
    assert plan["tokens_per_s"] == pytest.approx(ref["tokens_per_s"])  # the measured point itself
