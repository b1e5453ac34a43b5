"""scripts/run_ablation.py, two steps per launch: every switch of a variant trained for real, the
blind baseline, the table, resuming, and one-line config errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mllm.engine import free_port
from eval.ablation import load_ablation_config

REPO = Path(__file__).resolve().parents[2]
FAST = ["data.max_seq_len=1024", "data.buffer_size=8", "trainer.log_every=1", "optim.warmup_steps=1",
        "trainer.save_every=0"]


def run_ablation(config: Path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "scripts/run_ablation.py", "--config", str(config), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


def test_shipped_presets_parse():
    cfg = load_ablation_config("configs/ablation/tiny.yaml")
    assert [v.name for v in cfg.variants] == ["default", "no_proximal", "simvq", "no_rope", "no_vae"]
    assert cfg.variants[2].quant.kind == "simvq" and cfg.variants[4].vae_weight == 0 and cfg.blind


@pytest.mark.slow
def test_two_step_ablation_with_blind_baseline(tmp_path):
    from viq import ViQModel

    # A stage-1 export needs only viq/ (stage 2 builds a new LLM when llm/ is absent); the preset stands in
    # for a trained ViT, which the ablation's own stage-1 launch (configs/ablation/tiny.yaml) provides.
    ViQModel.from_pretrained("viq-tiny").save_pretrained(tmp_path / "stage1" / "viq")
    port = free_port()
    config = tmp_path / "ci.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ci", "out": str(tmp_path / "out"), "data_root": str(tmp_path / "data"), "synthetic_n": 24,
        "stage1_export": str(tmp_path / "stage1"), "master_port": port,
        "stage2": {"config": "configs/viq/tiny-stage2.yaml", "steps": 2,
                   "overrides": [*FAST, "viq_train.teacher=none"]},
        "mllm": {"config": "configs/mllm/tiny.yaml", "steps": 2, "overrides": FAST},
        "eval": {"limit": 2, "max_new_tokens": 4, "benchmarks": ["SYNTH_CHART", "SYNTH_DOC"]},
        # every switch at once: one stage-2 launch trains them all
        "variants": [{"name": "all_off", "quant": {"kind": "simvq", "proximal": False, "rope": False}, "vae_weight": 0}],
    }))
    proc = run_ablation(config, "--publish", str(tmp_path / "docs"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    table = json.loads((out / "table.json").read_text())
    variant, blind = table["rows"]
    assert [variant["name"], blind["name"]] == ["all_off", "blind"]
    # the variant's tokenizer really has the switches, and no VAE was built (no decoder exported)
    viq_dir = out / "variants" / "all_off" / "stage2" / "export" / "viq"
    quant = json.loads((viq_dir / "config.json").read_text())["quant"]
    assert (quant["kind"], quant["proximal"], quant["rope"]) == ("simvq", False, False)
    assert not (viq_dir / "decoder").exists() and variant["vae_latent_loss"] is None
    assert variant["commit_loss"] > 0 and variant["stage2_steps"] == 2 and variant["relative_time"] == 1.0
    assert variant["codebook_size"] == 1000 and variant["codes_counted"] > 0 and 0 < variant["codebook_usage"] <= 1
    assert variant["codebook_perplexity"] >= 1
    # the blind baseline: trained with vision.source none, and its export says so for evaluation
    marker = json.loads((out / "variants" / "blind" / "mllm" / "hf" / "viq_mllm.json").read_text())
    assert marker["vision_source"] == "none" and "codebook_usage" not in blind
    for row in (variant, blind):
        assert set(row["headlines"]) == {"SYNTH_CHART", "SYNTH_DOC"} and row["avg"] is not None
    md = (tmp_path / "docs" / "table.md").read_text()
    assert "| blind (no image information) |" in md and "SYNTH_CHART" in md and (tmp_path / "docs" / "table.png").is_file()

    # a rerun reads the finished rows back and launches nothing
    logs = sorted(p.name for p in (out / "logs").iterdir())
    again = run_ablation(config)
    assert again.returncode == 0 and again.stdout.count("finished before") == 2
    assert sorted(p.name for p in (out / "logs").iterdir()) == logs


def test_ablation_config_errors_are_one_line(tmp_path):
    proc = run_ablation(Path("configs/ablation/tiny.yaml"), "--set", "stage2.stepz=3")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "unknown config key 'stage2.stepz'; valid keys under stage2: config, overrides, steps" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {name: a, quant: {kind: vq}}\n")
    proc = run_ablation(bad)
    assert proc.returncode == 1 and "viq.quant.kind is 'vq'; valid values: fsq, simvq" in proc.stderr
