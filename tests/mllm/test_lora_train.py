"""LoRA through the real entry point (deepspeed launcher, CPU, gloo): the demo config trains,
exports and evaluates without peft; kill + resume equals the straight run; ZeRO-3 with two
ranks saves, resumes and merges whole tensors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from mllm.engine import free_port
from tests.fixtures import make_colour_dataset
from tests.mllm.test_train import DEEPSPEED, FAST, REPO, launch, metrics

DEMO = ["--config", "configs/mllm/tiny-lora.yaml"]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A local Qwen2.5-shaped checkpoint (tiny body, real tokenizer), as a user's downloaded base."""
    from data.tokenizer import load_qwen25_tokenizer
    from mllm.presets import build_llm

    root = tmp_path_factory.mktemp("base") / "tiny-qwen2.5"
    torch.manual_seed(0)
    build_llm("tiny", attn_implementation="sdpa").save_pretrained(root)
    load_qwen25_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=30)


def without_peft(code: str, *args) -> subprocess.CompletedProcess:
    """Run Python with peft unimportable, as on a machine that never installed it."""
    prelude = "import sys; sys.modules['peft'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


AS_A_USER_WITHOUT_PEFT = """
import runpy
import torch
from transformers import AutoModelForCausalLM
from mllm.export import load_export
hf, data_root, out = sys.argv[1:4]
sys.argv = ["eval.run", "--model", hf, "--benchmarks", "SYNTH_SHAPES", "--data-root", data_root, "--out", out,
            "--limit", "2", "--max-new-tokens", "4"]
try:
    runpy.run_module("eval.run", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
model, _, vocab = load_export(hf, attn_implementation="sdpa")
plain = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True, attn_implementation="sdpa")
ids = torch.tensor([[9707, 11, 1879, 0, vocab.code_base, vocab.row_end_id]])
with torch.no_grad():
    torch.testing.assert_close(plain(ids).logits, model.llm(ids).logits, rtol=0, atol=1e-5)
print("same logits")
"""


def tensor_shapes(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def kill_after_checkpoint(args, run_dir, step: int) -> None:
    """Start a long run, SIGKILL its whole launcher tree once checkpoint `step` is complete."""
    port = str(free_port())
    proc = subprocess.Popen([DEEPSPEED, "--num_gpus", "1", "--master_port", port, "scripts/train_mllm.py", *args,
                             "--run-dir", str(run_dir), "--max-steps", "60", "--save-every", str(step)],
                            cwd=REPO, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest, tag = run_dir / "checkpoints" / "latest", f"step_{step:08d}"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text() == tag):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text() == tag


@pytest.mark.slow
def test_lora_demo_trains_resumes_exports_and_evaluates(tmp_path):
    """The LoRA demo config on the synthetic demo data: the loss falls; a run killed after its
    step-5 checkpoint and resumed equals the straight run (adapters, optimizer, dropout RNG); the
    merged export evaluates with peft unimportable."""
    synthetic = tmp_path / "synthetic"
    common = [*DEMO, "--set", f"data.root={synthetic}", "--set", "data.synthetic_n=40", *FAST,
              "--set", "model.lora.dropout=0.1", "--set", "optim.schedule_steps=10"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch([*common, "--run-dir", str(straight), "--max-steps", "10"])
    rows = metrics(straight)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 3.0 and sum(losses[-3:]) < sum(losses[:3]) - 6.0, losses

    kill_after_checkpoint(common, killed, 5)
    launch([*common, "--run-dir", str(killed), "--max-steps", "10", "--resume", "auto"])
    resumed = metrics(killed)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for ra, rb in zip(rows, resumed):
        assert ra["data_fingerprint"] == rb["data_fingerprint"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-6), ra["step"]
    with safe_open(str(straight / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(killed / "hf" / "model.safetensors"), "pt") as b:
        for name in a.keys():
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), rtol=0, atol=1e-6, msg=name)

    # eval.run, then transformers' own AutoModelForCausalLM (what lm-eval's `hf` model loads), peft unimportable
    proc = without_peft(AS_A_USER_WITHOUT_PEFT, str(straight / "hf"), str(synthetic / "vlmeval"), str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert 0 <= json.loads(lines[-2])["scores"]["SYNTH_SHAPES"]["Overall"] <= 1
    assert lines[-1] == "same logits"


@pytest.mark.slow
def test_lora_zero3_two_ranks_save_resume_and_merge_whole_tensors(base_checkpoint, colour_data, tmp_path):
    """ZeRO-3 partitions every tensor (a rank's share of a small one can be empty): what is saved
    must be whole (peft #2450, #2946); the merged export and the adapter applied by peft onto the
    base checkpoint are the same model. Online codes, so the encoder path runs under LoRA too."""
    run = tmp_path / "z3"
    common = [*DEMO, "--set", f"data.train={colour_data}", *FAST, "--set", "trainer.zero_stage=3", "--run-dir", str(run),
              "--set", f"model.llm={base_checkpoint}", "--set", "model.lora.export_adapter=true",
              "--set", "model.lora.train_text_rows=false", "--set", "vision.source=online"]
    launch([*common, "--max-steps", "2", "--set", "trainer.export=false"], ranks=2)
    proc = launch([*common, "--max-steps", "3", "--resume", "auto"], ranks=2)
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]

    from mllm.export import load_export
    from mllm.lora_export import load_adapter_export

    merged, _, vocab = load_export(run / "hf", attn_implementation="sdpa")
    expected = {k: tuple(v.shape) for k, v in merged.llm.state_dict().items() if k != "lm_head.weight"}  # tied: one table
    assert tensor_shapes(run / "hf" / "model.safetensors") == expected
    assert expected["model.embed_tokens.weight"] == (vocab.total_rows, 64)
    adapter_shapes = tensor_shapes(run / "hf-adapter" / "adapter_model.safetensors")
    assert all(0 not in shape for shape in adapter_shapes.values()) and len(adapter_shapes) == 1 + 2 * 7 * 2
    assert adapter_shapes["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] == (
        vocab.total_rows - vocab.code_base, 64)
    adapted, _, _ = load_adapter_export(run / "hf-adapter", attn_implementation="sdpa")
    for (name, a), (_, b) in zip(merged.state_dict().items(), adapted.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
