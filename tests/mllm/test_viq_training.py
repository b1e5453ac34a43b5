"""ViQ tokenizer training (stages 1 and 2) on the MLLM trainer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.engine import free_port
from data.packing import collate_packed
from data.tokenizer import build_tokenizer
from mllm.model import build_mllm
from mllm.viq_training import ViQStageConfig, ViQTrainConfig, ViQTrainModel
from tests.fixtures import make_colour_dataset
from viq import ViQModel
from viq.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def tiny_model(stage_cfg: ViQStageConfig, **kw):
    viq = ViQModel.from_pretrained("viq-tiny")
    _, vocab = build_tokenizer("tiny", viq.config)
    torch.manual_seed(0)
    return ViQTrainModel(viq, build_mllm("tiny", vocab), stage_cfg, **kw), vocab


def image_batch(model, vocab, sizes):
    pixels = [torch.randn(3, h, w) for h, w in sizes]
    samples = []
    for p in pixels:
        h, w = p.shape[1] // 28, p.shape[2] // 28
        ids = [vocab.vision_start_id] + ([vocab.image_pad_id] * w + [vocab.row_end_id]) * h + [vocab.vision_end_id, 100, 200, 300]
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[:-3] = -100
        samples.append({"input_ids": ids, "labels": labels})
    batch = collate_packed(samples, 2048, pad_to_capacity=False)
    batch["images"] = pixels
    return batch


def test_distillation_loss_is_zero_for_identical_class_tokens():
    model, vocab = tiny_model(ViQStageConfig(stage=1, teacher="frozen", teacher_resolution=112))
    out = model(image_batch(model, vocab, [(112, 112), (112, 112)]))  # student sees the teacher's resolution
    assert out["logs"]["distill_loss"] == pytest.approx(0.0, abs=1e-6)
    out = model(image_batch(model, vocab, [(56, 168)]))  # another resolution: a real distillation signal
    assert out["logs"]["distill_loss"] > 1e-4
    assert out["n_supervised"] == 3 and torch.isfinite(out["loss_sum"])


def test_freezing_is_what_the_config_says():
    model, _ = tiny_model(ViQStageConfig(stage=1, train_vit=True, train_llm=False))
    assert all(p.requires_grad for p in model.viq.vit.parameters())
    assert not any(p.requires_grad for p in model.viq.quantizer.parameters())
    assert not any(p.requires_grad for p in model.mllm.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    model.cfg.train_vit, model.cfg.train_llm = False, True
    report = model.apply_freezing()
    assert report["viq"] == 0 and report["mllm"] == sum(p.numel() for p in model.mllm.llm.parameters())
    assert report["teacher"] == 0


def test_stage2_forward_reports_vae_loss_and_codebook_use():
    from viq.decoder import ViQDecoder, tiny_vae

    viq = ViQModel.from_pretrained("viq-tiny")
    decoder = ViQDecoder.from_vae(tiny_vae(0), viq.config.feature_dim, hidden_size=32)
    model, vocab = tiny_model(ViQStageConfig(stage=2, init_from="x", teacher="none"), decoder=decoder)
    assert all(p.requires_grad for p in model.viq.vit.parameters())  # train_vit defaults to True
    assert all(p.requires_grad for p in model.viq.quantizer.parameters())
    assert all(p.requires_grad for p in decoder.head.parameters()) and not any(p.requires_grad for p in decoder.vae.parameters())
    out = model(image_batch(model, vocab, [(56, 84), (112, 56)]))
    assert out["logs"]["vae_latent_loss"] > 0 and out["aux_loss"] > 0
    assert 0 < out["logs"]["codebook_usage"] <= 1 and out["logs"]["codebook_perplexity"] >= 1
    (out["aux_loss"] + out["loss_sum"]).backward()
    assert model.viq.quantizer.bottleneck.weight.grad.abs().sum() > 0
    assert decoder.head.proj_out.weight.grad.abs().sum() > 0


def test_ema_teacher_moves_towards_the_student():
    model, _ = tiny_model(ViQStageConfig(stage=1, teacher="ema", ema_decay=0.5))
    with torch.no_grad():
        for p in model.viq.vit.parameters():
            p.add_(1.0)
    before = next(model.teacher.parameters()).clone()
    student = next(model.viq.vit.parameters())
    model.update_teacher()
    assert torch.allclose(next(model.teacher.parameters()), (before + student) / 2)


def test_stage_config_validation():
    with pytest.raises(ConfigError, match="viq_train.stage=2 needs viq_train.init_from"):
        from_dict(ViQTrainConfig, {"vision": {"source": "online"}, "viq_train": {"stage": 2}}).validate()
    with pytest.raises(ConfigError, match="set vision.source=online"):
        from_dict(ViQTrainConfig, {"viq_train": {"stage": 1}}).validate()
    with pytest.raises(ConfigError, match=r"unknown config key 'viq_train.phases\[0\].pixels'"):
        from_dict(ViQTrainConfig, {"viq_train": {"phases": [{"pixels": 5}]}})
    with pytest.raises(ConfigError, match="init_vit_from starts stage 1 from a vision tower; stage 2 starts from"):
        from_dict(ViQTrainConfig, {"vision": {"source": "online"},
                                   "viq_train": {"stage": 2, "init_from": "x", "init_vit_from": "y"}}).validate()
    with pytest.raises(ConfigError, match="'viq_train.init_vit_layers' must be >= 0"):
        from_dict(ViQTrainConfig, {"vision": {"source": "online"}, "viq_train": {"init_vit_layers": -1}}).validate()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "viq").glob("*.yaml")))
def test_tokenizer_training_presets_load_and_validate(name):
    from mllm.config import load_config
    from viq.model import get_preset

    cfg = load_config(REPO / "configs" / "viq" / name, [], cls=ViQTrainConfig)
    if cfg.viq_train.stage == 1:
        get_preset(cfg.model.viq)  # the tower presets' shapes are checked in tests/viq/test_towers.py


def launch_viq(args, timeout=900):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    port = str(free_port())
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "1", "--master_port", port, "scripts/train_viq.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_stage1_then_stage2_train_through_deepspeed_and_export_a_tokenizer(tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=12)
    common = ["--set", f"data.train={train}", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
              "--set", "trainer.log_every=1", "--set", "data.buffer_size=12", "--set", "optim.warmup_steps=1",
              "--set", "viq_train.teacher_resolution=56"]
    s1 = tmp_path / "s1"
    proc = launch_viq(["--stage", "1", "--config", "configs/viq/tiny-stage1.yaml", *common, "--run-dir", str(s1),
                       "--max-steps", "6", "--set",
                       "viq_train.phases=[{max_pixels: 3136, max_seq_len: 512, steps: 3}, {max_pixels: 12544, max_seq_len: 1024, steps: 3}]"])
    assert "resolution phase 1 (max_pixels 12544, 1024 tokens" in proc.stdout
    r1 = rows(s1)
    assert r1[-1]["loss"] < r1[0]["loss"] and "distill_loss" in r1[0]
    assert (s1 / "export" / "viq" / "config.json").is_file()

    s2 = tmp_path / "s2"
    launch_viq(["--stage", "2", "--config", "configs/viq/tiny-stage2.yaml", *common, "--run-dir", str(s2),
                "--max-steps", "6", "--set", f"viq_train.init_from={s1 / 'export'}", "--set", "optim.lr=3e-3",
                "--set", "data.max_seq_len=1024", "--set", "viq_train.latent_head_hidden=64"])
    r2 = rows(s2)
    assert r2[-1]["vae_latent_loss"] < r2[0]["vae_latent_loss"]
    assert 0 < r2[-1]["codebook_usage"] <= 1 and r2[-1]["codebook_perplexity"] >= 1
    # the exported tokenizer drives code extraction
    viq = ViQModel.from_pretrained(s2 / "export" / "viq")
    codes = viq.encode([str(train.parent / "images" / "000.png")])
    assert codes[0].shape[-1] == 4 and int(codes[0].max()) < viq.codebook_size
    out = subprocess.run([sys.executable, "scripts/extract_codes.py", "--tokenizer", str(s2 / "export" / "viq"),
                          "--data", str(train), "--out", str(tmp_path / "codes")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and '"images_encoded": 12' in out.stdout
    # ... and reconstruction through its decoder, with the metrics computed offline
    rec = subprocess.run([sys.executable, "scripts/eval_reconstruction.py", "--tokenizer", str(s2 / "export" / "viq"),
                          "--images", str(train.parent / "images"), "--limit", "3", "--no-fid",
                          "--out", str(tmp_path / "recon")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rec.returncode == 0, rec.stderr[-2000:]
    metrics = json.loads((tmp_path / "recon" / "metrics.json").read_text())
    assert metrics["psnr"] > 0 and 0 < metrics["ssim"] <= 1 and (tmp_path / "recon" / "grid.png").is_file()


@pytest.mark.slow
def test_stage1_starts_from_a_saved_siglip_tower_and_trains(tmp_path):
    """The CPU demo of `viq_train.init_vit_from`: a random-weight SigLIP saved by transformers, stage 1 from it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=96, image_size=56, patch_size=14))
    tower.save_pretrained(tmp_path / "siglip")
    train = make_colour_dataset(tmp_path / "d", n=12)
    run = tmp_path / "s1"
    args = ["--stage", "1", "--config", "configs/viq/tiny-stage1.yaml", "--run-dir", str(run), "--max-steps", "4",
            "--set", f"data.train={train}", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
            "--set", "trainer.log_every=1", "--set", "data.buffer_size=12", "--set", "optim.warmup_steps=1",
            "--set", "viq_train.teacher_resolution=56", "--set", f"viq_train.init_vit_from={tmp_path / 'siglip'}",
            "--set", "viq_train.phases=[{max_pixels: 12544, max_seq_len: 1024, steps: 4}]"]
    proc = subprocess.run([sys.executable, "scripts/train_viq.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))  # a lone process: world of one
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "a SiglipVisionConfig; the ViT takes its architecture: width 192 -> 64, depth 4 -> 2" in log
    assert "loaded 29 tensors" in log and "new (initialised here): cls_token, merge" in log
    assert "dropped from the tower: head.probe, head.attention, head.layernorm, head.mlp" in log  # the pooling head
    r = rows(run)
    assert len(r) == 4 and r[-1]["loss"] < r[0]["loss"] and "distill_loss" in r[0]
    viq = ViQModel.from_pretrained(run / "export" / "viq")  # the tower's architecture travels with the export
    assert (viq.config.width, viq.config.rope, viq.config.class_token, viq.config.image_mean) == (64, False, "readout", [0.5] * 3)
    start = tower.embeddings.patch_embedding.weight.detach().reshape(64, -1)
    moved = (viq.vit.patch_embed.weight - start).norm() / start.norm()
    assert 0 < moved < 0.1  # trained from the tower's weights, not from a fresh initialisation
    assert viq.encode([str(train.parent / "images" / "000.png")])[0].shape[-1] == 4
