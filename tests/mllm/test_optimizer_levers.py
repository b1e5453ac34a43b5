"""The optimizer levers (optim.implementation, ZeRO stage 0/1/2) take the same AdamW step as a
plain PyTorch loop: same losses, same parameters after three steps (tests/mllm/optimizer_worker.py)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.config import load_config
from mllm.optimizers import configure_optimizer
from viq.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim") / "runs.pt"
    proc = subprocess.run([sys.executable, "tests/mllm/optimizer_worker.py", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.slow
def test_every_fp32_implementation_and_stage_equals_the_plain_adamw_loop(runs):
    ref = runs["reference"]
    fp32 = [k for k in runs if k.endswith("/fp32")]
    assert len(fp32) == 6
    for name in fp32:
        run = runs[name]
        assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6), name
        assert max_difference(run["params"], ref["params"]) < 5e-5, name
    # the step really changed the parameters (the comparison is not between two untouched models)
    assert ref["losses"][2] < ref["losses"][0]
    # the lever is what ran: DeepSpeed kept the client optimizer and its kernel choice
    assert runs["torch_fused/zero2/fp32"]["fused"] is True and runs["torch_foreach/zero1/fp32"]["foreach"] is True
    assert runs["config/zero1/fp32"]["fused"] is None
    assert runs["torch_fused/zero2/fp32"]["wrapper"] == "DeepSpeedZeroOptimizer"
    assert runs["torch_fused/zero0/fp32"]["wrapper"] == "AdamW"


@pytest.mark.slow
def test_fused_adamw_in_bf16_matches_the_config_optimizer(runs):
    a, b = runs["torch_fused/zero1/bf16"], runs["config/zero1/bf16"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-3)
    # Both update fp32 master weights from bf16 gradients; Adam turns tiny gradient differences
    # into steps of up to lr on small parameters, so the bound is on the whole model's norm.
    diff = sum(float((a["params"][n] - ref).pow(2).sum()) for n, ref in b["params"].items())
    norm = sum(float(ref.pow(2).sum()) for ref in b["params"].values())
    assert (diff / norm) ** 0.5 < 1e-2
    assert a["losses"] == pytest.approx(runs["reference"]["losses"], rel=2e-2)  # bf16 tolerance against fp32


def test_optimizer_implementation_errors():
    with pytest.raises(ConfigError, match="'optim.implementation' is 'apex'; valid values: config, torch_foreach"):
        load_config(None, ["optim.implementation=apex"])
    cfg = load_config(None, ["optim.implementation=torch_fused"])
    offload = {"optimizer": {"params": {}}, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offloads the optimizer to the CPU.*optim.implementation=config"):
        configure_optimizer([], cfg.optim, offload, torch.device("cpu"))
    cfg = load_config(None, ["optim.implementation=deepspeed_fused"])
    with pytest.raises(ConfigError, match="deepspeed_fused is DeepSpeed's CUDA FusedAdam"):
        configure_optimizer([], cfg.optim, offload, torch.device("cpu"))
    with pytest.raises(ConfigError, match="'model.compile_mode' is 'fast'; valid values: default, reduce-overhead"):
        load_config(None, ["model.compile_mode=fast"])
    with pytest.raises(ConfigError, match="'model.kernels' is 'apex'; valid values: none, liger"):
        load_config(None, ["model.kernels=apex"])


def test_kernel_options_fail_with_the_key_where_they_cannot_apply():
    from mllm.kernels import apply_kernel_options
    from tests.mllm.test_model import make_model

    model = make_model()
    with pytest.raises(ConfigError, match="ZeRO-3's partitioned parameters"):
        apply_kernel_options(model, load_config(None, ["model.kernels=liger"]).model, zero_stage=3)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'model.fp8' needs a GPU with float8 tensor cores"):
            apply_kernel_options(model, load_config(None, ["model.fp8=true"]).model, zero_stage=1)
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match="'model.kernels' needs the 'liger_kernel' package"):
            apply_kernel_options(model, load_config(None, ["model.kernels=liger"]).model, zero_stage=1)
    assert apply_kernel_options(model, load_config(None).model, zero_stage=3) == []
