"""The throughput benchmark: the tiny CPU mode end to end, the continuous encoders' shapes and FLOPs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mllm.engine import free_port
from mllm.bench.encoders import CONTINUOUS_ENCODERS, ContinuousEncoder, build_projector, encoder_forward_flops, merge_patches

REPO = Path(__file__).resolve().parents[2]


def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, "scripts/bench_throughput.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_mode_reports_every_arm_and_the_lever_sweep(tmp_path):
    proc = run_bench("--mode", "tiny", "--steps", "1", "--warmup", "1", "--micro-batch-tokens", "2048",
                     "--loss-impl", "fused", "--sweep-levers", "--sweep-variants", "optimizer_torch_fused,zero0",
                     "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_throughput.json").read_text())
    assert result == json.loads(proc.stdout) and result["device"] == "cpu"
    (point,) = result["points"]
    assert point["errors"] == {}
    assert list(point["arms"]) == ["codes", "online_viq", "internvit-tiny_frozen", "internvit-tiny_trainable",
                                   "siglip-tiny_frozen", "siglip-tiny_trainable", "siglip-tiny-llava-ov_frozen",
                                   "siglip-tiny-llava-ov_trainable"]
    # two 1024-token packs per micro-batch, 112 px images = 4 x 4 image positions each
    assert point["tokens_per_micro_batch"] == 2048 and point["image_positions"] == 16 * point["images"]
    for arm, e in point["arms"].items():  # LLaVA-OV's layout: 8 x 8 positions per 112 px crop, fewer samples per pack
        assert e["image_positions"] == (64 if "llava-ov" in arm else 16) * e["images"]
    ov, codes = point["arms"]["siglip-tiny-llava-ov_frozen"], point["arms"]["codes"]
    assert ov["images"] < point["images"] and ov["codes_sample_speedup"] == pytest.approx(
        codes["samples_per_s"] / ov["samples_per_s"])
    assert 0.2 < point["image_token_share"] < 0.8
    assert point["settings"]["micro_batch_packs"] == 2 and point["settings"]["loss_impl"] == "fused"
    for arm, e in point["arms"].items():
        assert e["step_ms"] > 0 and e["forward_ms"] > 0 and e["tokens_per_s"] > 0 and e["samples_per_s"] > 0
        assert e["loss"] == pytest.approx(e["loss"]) and 5 < e["loss"] < 20  # finite, about ln(216k) at random init
        assert ("codes_step_speedup" in e) == (arm != "codes")
        if arm != "codes":
            assert e["codes_step_speedup"] == pytest.approx(e["step_ms"] / point["arms"]["codes"]["step_ms"])
    trainable = {arm: e["trainable_params"] for arm, e in point["arms"].items()}
    assert trainable["codes"] == trainable["online_viq"]  # the ViQ encoder is frozen
    assert trainable["internvit-tiny_trainable"] > trainable["internvit-tiny_frozen"] > trainable["codes"]  # + projector
    labels = [p["lever"] for p in result["lever_sweep"]]
    assert labels == ["naive: 1 pack, full checkpointing, chunked CE, eager", "+ 2 packs per micro-batch",
                      "+ no checkpointing", "+ fused linear cross-entropy", "final, optimizer torch_fused",
                      "final, ZeRO stage 0"]
    assert result["lever_sweep"][3]["arms"]["codes"] == point["arms"]["codes"]
    for variant, key, value in ((-2, "optimizer", "torch_fused"), (-1, "zero_stage", 0)):  # one lever each, measured
        sweep_point = result["lever_sweep"][variant]
        assert sweep_point["settings"] == {**point["settings"], key: value} and sweep_point["arms"]["codes"]["step_ms"] > 0
        assert len(sweep_point["arms"]["codes"]["step_ms_each"]) == 1
    md = (tmp_path / "bench_throughput.md").read_text()
    assert "| TINY 1k | siglip-tiny_trainable |" in md and "+ fused linear cross-entropy" in md
    assert (tmp_path / "bench_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_gradient_accumulation_times_whole_optimizer_steps(tmp_path):
    proc = run_bench("--mode", "tiny", "--arms", "codes", "--grad-accum", "2", "--steps", "1", "--warmup", "1",
                     "--sweep-levers", "--sweep-variants", "none", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_throughput.json").read_text())
    (point,) = result["points"]
    e = point["arms"]["codes"]
    assert point["settings"]["grad_accum"] == 2
    # one step = the two different micro-batches: about twice one pack's real tokens
    assert e["tokens_per_s"] * e["step_ms"] / 1e3 == pytest.approx(2 * point["real_tokens"], rel=0.2)
    assert [p["lever"] for p in result["lever_sweep"]] == [
        "naive: 1 pack, full checkpointing, chunked CE, eager", "+ 2 micro-batches per optimizer step", "+ no checkpointing"]


@pytest.mark.slow
def test_bench_rejects_unknown_arm_and_encoder():
    proc = run_bench("--mode", "tiny", "--arms", "codes,pixels")
    assert proc.returncode != 0
    assert "unknown arm(s) ['pixels']; valid: codes, online_viq, internvit-tiny_frozen" in proc.stderr
    proc = run_bench("--mode", "tiny", "--encoders", "clip-l")
    assert proc.returncode != 0 and "unknown continuous encoder 'clip-l'; valid: internvit-300m" in proc.stderr
    proc = run_bench("--mode", "tiny", "--llm", "nope", "--arms", "codes")
    assert proc.returncode == 1 and "[bench] nope 1024 codes: MissingFileError: 'nope' is neither" in proc.stderr
    assert "bench_throughput: 1 arm(s) failed: nope 1024 codes" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_bench("--mode", "paper")
        assert proc.returncode != 0 and "--mode paper builds 0.5B-7B LLMs and needs a GPU" in proc.stderr


def test_merge_patches_follows_the_image_pad_layout():
    grid, d = 4, 1
    patches = torch.arange(grid * grid, dtype=torch.float32).view(1, grid * grid, d)  # value = row * 4 + col
    merged = merge_patches(patches, grid, 2)
    assert merged.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.parametrize("name,positions", [("internvit-tiny", 25), ("siglip-tiny", 25), ("siglip-tiny-llava-ov", 64)])
def test_encoder_shapes_and_flops_match_a_flop_counter(name, positions):
    spec = CONTINUOUS_ENCODERS[name]
    encoder, projector = ContinuousEncoder(spec), build_projector(spec, 32)
    side = spec.crop_size or 140  # 140: not the native 112 px, position embeddings are resized
    pixels = torch.randn(3, 3, side, side)
    # the math backend runs attention as matmuls, which the counter sees on CPU
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out = projector(encoder(pixels))
    assert out.shape == (3 * positions, 32) and encoder.tokens_per_image(140) == positions
    assert counter.get_total_flops() == encoder_forward_flops(spec, 140, 3, 32)
    with pytest.raises(ValueError, match="112 px crops" if spec.crop_size else "divisible by 28"):
        encoder(torch.randn(1, 3, 130, 130))


def test_llava_ov_arm_reads_the_last_kept_block_without_the_post_norm():
    spec = CONTINUOUS_ENCODERS["siglip-tiny-llava-ov"]
    encoder = ContinuousEncoder(spec).eval()
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = encoder.tower(pixel_values=pixels, output_hidden_states=True)
        features = encoder(pixels)
    assert len(encoder.tower.encoder.layers) == 2
    torch.testing.assert_close(features, out.hidden_states[2].reshape(2 * 64, 72))
    assert not torch.allclose(features, out.last_hidden_state.reshape(2 * 64, 72))  # that one is post-LayerNorm


def test_paper_encoders_are_the_released_towers():
    """transformers' own classes with the published configs (parameter counts of the released towers
    without their heads); built on the meta device, nothing allocated."""
    from transformers import InternVLVisionModel, SiglipVisionModel

    with torch.device("meta"):
        encoders = {name: ContinuousEncoder(CONTINUOUS_ENCODERS[name])
                    for name in ("internvit-300m", "siglip-so400m", "siglip-so400m-llava-ov")}
        projectors = {name: build_projector(CONTINUOUS_ENCODERS[name], 896) for name in encoders}
    counts = {name: sum(p.numel() for p in e.parameters()) for name, e in encoders.items()}
    assert isinstance(encoders["internvit-300m"].tower, InternVLVisionModel) and 300e6 < counts["internvit-300m"] < 310e6
    assert isinstance(encoders["siglip-so400m"].tower, SiglipVisionModel) and 410e6 < counts["siglip-so400m"] < 420e6
    assert counts["siglip-so400m"] - counts["siglip-so400m-llava-ov"] == sum(
        p.numel() for p in encoders["siglip-so400m"].tower.encoder.layers[-1].parameters())  # one block fewer
    assert type(projectors["internvit-300m"]).__name__ == "InternVLMultiModalProjector"
    assert projectors["internvit-300m"].linear_1.in_features == 4 * 1024
    assert type(projectors["siglip-so400m-llava-ov"]).__name__ == "LlavaOnevisionMultiModalProjector"
    assert projectors["siglip-so400m-llava-ov"].linear_1.in_features == 1152
    assert encoders["siglip-so400m-llava-ov"].tokens_per_image(448) == 729


@pytest.mark.slow
def test_bench_under_the_deepspeed_launcher_counts_every_rank(tmp_path):
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    port = str(free_port())
    proc = subprocess.run(
        [deepspeed, "--num_gpus", "2", "--master_port", port, "scripts/bench_throughput.py", "--mode", "tiny",
         "--steps", "1", "--warmup", "1", "--arms", "codes,siglip-tiny_trainable", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (point,) = json.loads((tmp_path / "bench_throughput.json").read_text())["points"]
    assert point["world_size"] == 2 and point["errors"] == {}
    for e in point["arms"].values():  # tokens of both ranks' packs over one step's time
        assert e["tokens_per_s"] == pytest.approx(2 * point["real_tokens"] / (e["step_ms"] / 1e3), rel=0.25)


@pytest.mark.slow
def test_profile_step_prints_the_phase_split():
    proc = subprocess.run([sys.executable, "scripts/profile_step.py", "--warmup", "1", "--steps", "1", "--rows", "3",
                           "--image-size", "112", "--optimizer", "torch_fused"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in ("benchmark steps", "forward", "backward", "optimizer step", "train_step", "profiled step"):
        assert f"  {phase}" in proc.stdout
    assert "tiny at 1024 x 1 packs" in proc.stdout and "Self CPU time total" in proc.stdout
    bad = subprocess.run([sys.executable, "scripts/profile_step.py", "--llm", "nope"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("profile_step: error: 'nope' is neither")


@pytest.mark.slow
def test_lora_arm_is_measured_and_the_estimate_counts_the_same_trainable_parameters(tmp_path):
    """--lora-rank trains adapters + code rows through the real trainer; --estimate (no GPU needed,
    labelled "estimated") counts the same trainable parameters for the same model."""
    proc = run_bench("--mode", "tiny", "--arms", "codes", "--lora-rank", "4", "--steps", "1", "--warmup", "1",
                     "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (point,) = json.loads(proc.stdout)["points"]
    assert point["settings"]["lora_rank"] == 4 and point["errors"] == {}
    measured = point["arms"]["codes"]
    proc = run_bench("--estimate", "--llm", "tiny", "--viq", "viq-tiny", "--capacity", "1024", "--lora-rank", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    (estimate,) = result["points"]
    assert result["source"].startswith("estimated") and estimate["lora"]["source"] == estimate["full"]["source"] == "estimated"
    assert estimate["lora"]["trainable_params"] == measured["trainable_params"]
    assert estimate["lora"]["peak_memory_gib"] < estimate["full"]["peak_memory_gib"]
    assert "[bench] estimated tiny 1024 full: peak" in proc.stderr


def test_the_estimate_counts_the_parameters_the_libraries_build():
    """The first-principles estimate (mllm/bench/estimate.py) counts Qwen2.5-7B as transformers
    builds it, adapters as peft injects them, and what trains under LoRA as the trainer sets it."""
    from peft import inject_adapter_in_model
    from transformers import Qwen2ForCausalLM

    from mllm.bench.estimate import estimate_step, parameter_counts
    from mllm.lora import LoraSettings, check_lora_trainable, peft_lora_config
    from mllm.presets import preset_config
    from tests.mllm.test_lora import TOTAL, lora_model

    config = preset_config("qwen2.5-7b")
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(config)
    counts = parameter_counts(config, config.vocab_size)
    assert counts["body"] + counts["tables"] == sum(p.numel() for p in llm.parameters()) == 7_615_616_512
    settings = LoraSettings(enabled=True, rank=16, layers=[0, 3, 27], target_modules=["q_proj", "v_proj", "down_proj"],
                            use_dora=True)
    inject_adapter_in_model(peft_lora_config(settings), llm)
    assert parameter_counts(config, config.vocab_size, settings)["lora"] == sum(
        p.numel() for n, p in llm.named_parameters() if "lora_" in n)
    assert parameter_counts(config, config.vocab_size, LoraSettings(rank=16))["lora"] == 40_370_176  # peft's figure for 7B

    for tied in (True, False):
        model = lora_model(tied=tied, perturb=False)
        tiny = preset_config("tiny", tie_word_embeddings=tied)  # the checkpoint's config: rows before the code vocabulary
        estimate = estimate_step(tiny, TOTAL, 1024, lora=LoraSettings(enabled=True, rank=4))
        trained = sum(check_lora_trainable(model).values()) + sum(p.numel() for p in model.merger.parameters())
        assert estimate["trainable_params"] == trained and estimate["source"] == "estimated"
        assert estimate["params"]["total"] == sum(p.numel() for p in model.parameters())
