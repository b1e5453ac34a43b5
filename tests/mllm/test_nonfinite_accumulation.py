"""trainer.nonfinite=skip with gradient accumulation: a skipped micro-batch must not shift
DeepSpeed's accumulation boundary (the optimizer step would then land inside the next step).

In-process trainers on the real DeepSpeed engine (one gloo rank). The model is the real
ViQMLLM whose loss turns NaN for a micro-batch marked `poison`; the reference run feeds the
same micro-batch unmarked. That micro-batch has no supervised token, so its own gradient is
exactly zero and both runs must give identical parameters after every step."""
from __future__ import annotations

import os

import pytest
import torch

from mllm.config import load_config
from mllm.model import ViQMLLM
from mllm.trainer import Trainer
from tests.fixtures import make_colour_dataset


class PoisonableMLLM(ViQMLLM):
    def forward(self, batch: dict, **kwargs) -> dict:
        out = super().forward({k: v for k, v in batch.items() if k != "poison"}, **kwargs)
        if batch.get("poison"):
            out["loss_sum"] = out["loss_sum"] * float("nan")
        return out


class PoisonTrainer(Trainer):
    def build_model(self):
        model = super().build_model()
        return PoisonableMLLM(model.llm, model.vocab)


@pytest.fixture
def isolated_env():
    """The trainer sets RANK/WORLD_SIZE/MASTER_* and a process group; undo both afterwards."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def unsupervised(batch: dict) -> dict:
    """The same micro-batch with nothing supervised: a zero gradient of its own."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100), "n_supervised": 0}


def run(tmp_path, data, name: str, poison: bool) -> list[dict[str, torch.Tensor]]:
    cfg = load_config(None, [f"data.train={data}", "data.max_seq_len=512", "data.buffer_size=16", "trainer.grad_accum=2",
                             "trainer.nonfinite=skip", f"trainer.runs_dir={tmp_path}", f"trainer.run_name={name}",
                             "trainer.progress=false", "trainer.tensorboard=false", "optim.warmup_steps=0"])
    trainer = PoisonTrainer(cfg)
    micro = [next(trainer.batches) for _ in range(6)]
    micro[0] = {**unsupervised(micro[0]), "poison": poison}
    snapshots = []
    for step in range(3):
        metrics = trainer.train_step(micro[2 * step: 2 * step + 2])
        assert metrics["skipped_micro_batches"] == (1 if poison and step == 0 else 0)
        assert trainer.engine.global_steps == step + 1  # one optimizer step per train_step, in place
        snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    trainer.engine.destroy()
    return snapshots


@pytest.mark.slow
def test_a_skipped_micro_batch_keeps_the_accumulation_boundary(tmp_path, isolated_env):
    data = make_colour_dataset(tmp_path / "colours", n=24)
    poisoned = run(tmp_path, data, "poisoned", poison=True)
    reference = run(tmp_path, data, "reference", poison=False)
    for step, (got, want) in enumerate(zip(poisoned, reference), start=1):
        for name, value in want.items():
            assert torch.equal(got[name], value), f"step {step}: {name} differs"
    assert not torch.equal(poisoned[0]["merger.weight"], poisoned[1]["merger.weight"])  # the steps did update
