"""Run by tests/mllm/test_optimizer_levers.py in its own process (DeepSpeed's process group and
environment stay out of the test session): three optimizer steps of the tiny MLLM under each
optimizer implementation / ZeRO stage, and under a plain PyTorch loop (torch.optim.AdamW with a
Python loop over parameters, clip_grad_norm_, the trainer's schedule) as the reference.

    python tests/mllm/optimizer_worker.py <out.pt>

Writes {variant: {"losses": [...], "params": {name: tensor}}} with variant "reference" or
"<implementation>/zero<stage>/<dtype>".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from mllm.config import load_config  # noqa: E402
from mllm.engine import build_param_groups, init_distributed, initialize_engine, load_ds_config, warmup_cosine  # noqa: E402
from data.vocab import CodeVocab  # noqa: E402
from mllm.model import build_mllm  # noqa: E402
from tests.mllm.test_model import pack  # noqa: E402

# A 1k-row text vocabulary instead of Qwen's 152k: the optimizer step is what is compared, and
# the small tables keep each engine's steps to a fraction of a second on a CPU.
VOCAB = CodeVocab(text_vocab_size=1000, embedding_rows=1024, codebook_size=64,
                  vision_start_id=990, vision_end_id=991, image_pad_id=992)

STEPS = 3
VARIANTS = [("config", 0, "fp32"), ("config", 1, "fp32"), ("config", 2, "fp32"), ("torch_foreach", 1, "fp32"),
            ("torch_fused", 0, "fp32"), ("torch_fused", 2, "fp32"),
            ("config", 1, "bf16"), ("torch_fused", 1, "bf16")]


def settings(impl="config", stage=1):
    # weight decay on, a high LR and a clip that engages: every part of the update is exercised
    return load_config(None, [f"optim.implementation={impl}", f"trainer.zero_stage={stage}", "optim.lr=5e-3",
                              "optim.weight_decay=0.1", "optim.warmup_steps=2", "optim.grad_clip=0.5",
                              f"trainer.max_steps={STEPS}"])


def make_model(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_mllm("tiny", VOCAB, attn_implementation="sdpa", dtype=dtype, seed=seed, vocab_size=VOCAB.embedding_rows,
                      bos_token_id=0, eos_token_id=1)


def sample(gen, n_text: int, grid):
    """(input_ids, labels, codes): text, an image block of `grid` (or none), text; the answer half supervised."""
    text = lambda n: torch.randint(0, 900, (n,), generator=gen)  # noqa: E731
    block, codes = [], torch.zeros((0, 4), dtype=torch.long)
    if grid:
        h, w = grid
        block = [VOCAB.vision_start_id] + ([VOCAB.image_pad_id] * w + [VOCAB.row_end_id]) * h + [VOCAB.vision_end_id]
        codes = torch.randint(VOCAB.code_base, VOCAB.code_base + VOCAB.codebook_size, (h * w, 4), generator=gen)
    ids = torch.cat([text(3), torch.tensor(block, dtype=torch.long), text(n_text)])
    labels = ids.clone()
    labels[: len(ids) - n_text // 2] = -100
    return ids, labels, codes


def batches():
    gen = torch.Generator().manual_seed(11)
    return [pack([sample(gen, 30, (2, 3)), sample(gen, 22, None), sample(gen, 17, (3, 2))]) for _ in range(2)]


def state(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def reference() -> dict:
    cfg = settings()
    model = make_model(seed=3)
    groups, _ = build_param_groups(model, cfg)
    o = cfg.optim
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, o.warmup_steps, STEPS, o.min_lr_ratio))
    losses = []
    for i in range(STEPS):
        batch = batches()[i % 2]
        optimizer.zero_grad(set_to_none=True)
        out = model(batch)
        loss = out["loss_sum"] / out["n_supervised"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "params": state(model)}


def through_deepspeed(impl: str, stage: int, dtype: str) -> dict:
    cfg = settings(impl, stage)
    use_bf16 = dtype == "bf16"
    model = make_model(seed=3, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    engine, _, _ = initialize_engine(model, cfg, use_bf16, load_ds_config(cfg, use_bf16))
    kind = type(engine.optimizer).__name__
    losses = []
    for i in range(STEPS):
        out = engine(batches()[i % 2])
        loss = out["loss_sum"] / out["n_supervised"]
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        losses.append(float(loss.detach()))
    inner = engine.basic_optimizer
    flags = {k: inner.defaults.get(k) for k in ("foreach", "fused")}
    return {"losses": losses, "params": state(engine.module), "optimizer": type(inner).__name__, "wrapper": kind, **flags}


def main():
    init_distributed()
    results = {"reference": reference()}
    for impl, stage, dtype in VARIANTS:
        results[f"{impl}/zero{stage}/{dtype}"] = through_deepspeed(impl, stage, dtype)
    torch.save(results, sys.argv[1])


if __name__ == "__main__":
    main()
