"""The CPU demo's first 30 losses are fixed: a silent numerical change fails here.

The run is the embedded default (`./dev.sh train`: tiny LLM, viq-tiny codes, the synthetic
demo set, fp32 on CPU) cut to 30 steps with the demo's 300-step schedule, so its losses are
the demo's own first 30. After a change that is meant to move them, regenerate and say why
in the commit:

    VIQ_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/mllm/test_golden_loss.py
"""
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from tests.mllm.test_train import launch, metrics

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_demo_losses.json"
STEPS = 30
TOLERANCE = 1e-4


@pytest.mark.slow
def test_demo_losses_match_the_golden_curve(tmp_path):
    run = tmp_path / "run"
    launch(["--run-dir", str(run), "--max-steps", str(STEPS), "--set", f"data.root={tmp_path / 'synthetic'}",
            "--set", "optim.schedule_steps=300", "--set", "trainer.log_every=1", "--set", "trainer.export=false",
            "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false"],
           env_extra={"OMP_NUM_THREADS": "2"})
    losses = [row["loss"] for row in metrics(run)]
    assert len(losses) == STEPS
    if os.environ.get("VIQ_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({
            "what": f"loss of steps 1-{STEPS} of the embedded default (tests/mllm/test_golden_loss.py)",
            "torch": torch.__version__, "machine": platform.machine(), "losses": losses}, indent=1) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())["losses"]
    for step, (got, want) in enumerate(zip(losses, golden), start=1):
        assert got == pytest.approx(want, rel=TOLERANCE, abs=TOLERANCE), (
            f"step {step}: loss {got!r}, golden {want!r}; if the change is meant to move the numbers, "
            f"regenerate with VIQ_REGEN_GOLDEN=1 (see this file's docstring)")
