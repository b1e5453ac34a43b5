"""ZeRO-3 from construction, the fused loss under ZeRO-3, and a two-node launch (CPU, gloo).

One ZeRO-2 run is the reference: a ZeRO-3 run built partitioned (saved at step 5, resumed to
10) and a two-node run (one process per "node", each with its own code cache) must give its
losses; the ZeRO-3 export must equal the ZeRO-2 one.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.engine import free_port
from tests.fixtures import make_colour_dataset
from tests.mllm.test_train import DEEPSPEED, FAST, REPO, launch, metrics

STEPS = 10
LOSS_TOL = 1e-6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Qwen2.5-shaped checkpoints (tied and untied) as a user's local HF directories."""
    from data.tokenizer import load_qwen25_tokenizer
    from mllm.presets import build_llm

    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = load_qwen25_tokenizer()
    out = {}
    for tied in (True, False):
        torch.manual_seed(11)
        path = root / ("tied" if tied else "untied")
        build_llm("tiny", attn_implementation="sdpa", tie_word_embeddings=tied).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[tied] = path
    return out


@pytest.fixture(scope="module")
def common(tmp_path_factory, checkpoints):
    data = make_colour_dataset(tmp_path_factory.mktemp("colours"), n=30)
    return ["--set", f"data.train={data}", *FAST, "--set", f"model.llm={checkpoints[True]}",
            "--set", "optim.code_embedding_lr=1e-2", "--set", f"optim.schedule_steps={STEPS}"]


@pytest.fixture(scope="module")
def zero2_run(common, tmp_path_factory):
    run = tmp_path_factory.mktemp("z2") / "run"
    launch([*common, "--set", "trainer.zero_stage=2", "--run-dir", str(run), "--max-steps", str(STEPS)], ranks=2)
    return run


@pytest.fixture(scope="module")
def zero3_run(common, tmp_path_factory):
    run = tmp_path_factory.mktemp("z3") / "run"
    args = [*common, "--set", "trainer.zero_stage=3", "--run-dir", str(run)]
    launch([*args, "--max-steps", "5", "--set", "trainer.export=false"], ranks=2)
    first = metrics(run)
    proc = launch([*args, "--max-steps", str(STEPS), "--resume", "auto"], ranks=2)
    return run, first, proc


def assert_same_losses(rows, reference, tol=LOSS_TOL):
    assert [r["step"] for r in rows] == [r["step"] for r in reference[: len(rows)]]
    for got, want in zip(rows, reference):
        assert got["data_fingerprint"] == want["data_fingerprint"] and got["tokens"] == want["tokens"], got["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=tol, abs=tol), (got["step"], got["loss"], want["loss"])


def export_tensors(run):
    hf = run / "hf"
    tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return tensors


@pytest.mark.slow
def test_zero3_run_built_partitioned_equals_zero2_through_save_resume_and_export(zero2_run, zero3_run):
    run, first, proc = zero3_run
    reference = metrics(zero2_run)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert_same_losses(first, reference)  # steps 1-5 before the save
    assert "resumed from" in proc.stdout and "step 5" in proc.stdout
    assert_same_losses(metrics(run), reference)  # all 10 steps, 6-10 after the resume
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000005").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer partition per rank
    z2, z3 = export_tensors(zero2_run), export_tensors(run)
    assert z2.keys() == z3.keys() and any(k.endswith("embed_tokens.weight") for k in z3)
    for key, want in z2.items():
        assert z3[key].shape == want.shape and z3[key].dtype == want.dtype, key
        assert float((z3[key] - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max())), key
    from mllm.export import load_export

    model, _, vocab = load_export(run / "hf")
    assert model.llm.get_input_embeddings().weight.shape[0] == vocab.total_rows == model.llm.config.vocab_size
    # the planner's model-state bytes (parameters + optimizer state) against what DeepSpeed holds
    # on rank 0 after step 1: the whole model under ZeRO-2, a half shard under ZeRO-3
    memory = json.loads((zero2_run / "memory.json").read_text())
    assert abs(memory["measured_states"] / memory["planned_states"] - 1) <= 0.15, memory
    memory = json.loads((run / "memory.json").read_text())
    assert memory["measured"]["optimizer"] > 0, memory  # ZeRO-3 keeps its fp32 partitions outside the param groups
    assert abs(memory["measured_states"] / memory["planned_states"] - 1) <= 0.15, memory


@pytest.mark.slow
def test_two_nodes_equal_one_node(common, zero3_run, tmp_path):
    """Two "nodes" on localhost, one process each, through DeepSpeed's own launcher without ssh
    (--num_nodes 2 --node_rank K --no_ssh): the same losses as one node with two ranks. Each node
    runs in its own working directory with a relative code-cache path, i.e. a node-local disk:
    each node extracts its own cache; the run directory is shared."""
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(node),
               "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               str(REPO / "scripts" / "train_mllm.py"), *common, "--set", "trainer.zero_stage=3",
               "--set", "vision.codes_dir=node-local-codes", "--set", "trainer.export=false",
               "--run-dir", str(run), "--max-steps", "5"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} exit {p.returncode}\n{out[-3000:]}"
    _, one_node, _ = zero3_run
    rows = metrics(run)  # written by global rank 0 only: one row per step
    assert_same_losses(rows, one_node)
    assert len(rows) == 5
    for node in (0, 1):  # each node extracted its own cache on its own "disk"
        assert (tmp_path / f"node{node}" / "node-local-codes" / "manifest.json").is_file()
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000005").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = json.loads((run / "checkpoints" / "step_00000005" / "loop_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 5


@pytest.mark.slow
def test_zero3_construction_pitfalls_and_fused_loss(checkpoints, tmp_path):
    """tests/mllm/zero3_worker.py on two ranks: each pitfall of building under ZeRO-3, and the
    fused cross-entropy under ZeRO-3 against the chunked one."""
    port = str(free_port())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", port, "tests/mllm/zero3_worker.py",
                           str(checkpoints[False]), str(tmp_path / "facts")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests.mllm.test_model import VOCAB

    for rank in (0, 1):
        facts = json.loads((tmp_path / "facts" / f"rank{rank}.json").read_text())
        # no rank holds a whole parameter after construction; each holds half of the elements
        assert facts["whole_on_this_rank"] == []
        assert facts["local_elements"] <= facts["full_elements"] // 2 + 64 * 64
        # vocab size and row counts read whole, not from 0-sized shards
        assert facts["config_vocab_size"] == facts["embedding_rows"] == facts["head_rows"] == VOCAB.total_rows
        # checkpoint weights loaded shard by shard equal a plain load; the new rows were written
        # under gathered parameters (rank 0 modifying) and equal a plain build's
        assert facts["keys_equal"]
        for key, diff in facts["max_diff"].items():
            assert diff <= (1e-6 if "code_rows" in key else 0.0), key
        assert facts["new_rows_std"] > 1e-4
        assert "inside gathered()" in facts["extend_without_gather"]
        assert "empty weight (a ZeRO-3 shard)" in facts["fused_on_shard"]
        # a preset is initialised on rank 0 (std of Qwen2.5's initializer_range), the same on every rank
        assert facts["preset_same_on_all_ranks"] and 0.015 < facts["preset_q_std"] < 0.025
        assert facts["preset_new_rows_std"] > 1e-4
        # the fused loss under ZeRO-3 trains like the chunked one: the same losses over 3 steps and
        # the same reduced gradients, the head's and the code rows' included
        for fused, chunked in zip(facts["fused_losses"], facts["chunked_losses"]):
            assert fused == pytest.approx(chunked, rel=1e-5)
        grad_rel = facts["fused_vs_chunked_grad_rel"]
        assert any("code_rows" in name for name in grad_rel) and any("lm_head" in name for name in grad_rel), sorted(grad_rel)
        assert max(grad_rel.values()) < 1e-4, grad_rel
