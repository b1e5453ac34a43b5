"""Run by tests/mllm/test_zero3.py under `deepspeed --num_gpus 2` (CPU, gloo): builds models the
way the trainer does under ZeRO-3 and writes what it observed to <out>/rank<R>.json.

    deepspeed --num_gpus 2 tests/mllm/zero3_worker.py <untied checkpoint dir> <out dir>
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from mllm.config import load_config  # noqa: E402
from mllm.engine import construction_context, full_numel, gathered, init_distributed, initialize_engine, load_ds_config  # noqa: E402
from mllm.loss import fused_linear_cross_entropy  # noqa: E402
from mllm.model import build_mllm  # noqa: E402
from mllm.presets import build_llm  # noqa: E402
from mllm.vocab_tables import extend_vocabulary  # noqa: E402
from tests.mllm.test_model import VOCAB, make_sample, pack  # noqa: E402


def zero3_config(loss_impl="chunked"):
    cfg = load_config(None, ["trainer.zero_stage=3", "optim.warmup_steps=0", "optim.code_embedding_lr=1e-2",
                             f"model.loss_impl={loss_impl}"])
    return cfg, load_ds_config(cfg, use_bf16=False)


def whole_state(model) -> dict:
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build(checkpoint, loss_impl):
    """As Trainer.build_model does it: partitioned construction, then the split code rows."""
    cfg, ds = zero3_config(loss_impl)
    with construction_context(ds):
        model = build_mllm(checkpoint, VOCAB, attn_implementation="sdpa", gathered=gathered(3), loss_impl=loss_impl)
        model.split_code_rows()
    return model, cfg, ds


def train(checkpoint, loss_impl, steps=3):
    model, cfg, ds = build(checkpoint, loss_impl)
    engine, _, _ = initialize_engine(model, cfg, False, ds)
    gen = torch.Generator().manual_seed(7 + torch.distributed.get_rank())
    losses, grads = [], []
    for _ in range(steps):
        out = engine(pack([make_sample(gen, 30, (2, 3)), make_sample(gen, 25, None)]))
        loss = out["loss_sum"] / out["n_supervised"]
        engine.backward(loss, scale_wrt_gas=False)
        # the whole, rank-reduced gradient of every parameter, as the optimizer will see it
        grads.append({n: safe_get_full_grad(p).clone() for n, p in model.named_parameters() if p.requires_grad})
        engine.step()
        losses.append(float(loss))
    return losses, grads


def main():
    checkpoint, out_dir = sys.argv[-2], Path(sys.argv[-1])
    rank, world, _ = init_distributed()
    facts: dict = {"world": world}

    # 1. A local checkpoint, built partitioned: every parameter a shard, values those of a plain build.
    model, _, ds = build(checkpoint, "fused")
    facts["whole_on_this_rank"] = [n for n, p in model.named_parameters() if p.numel() > 0]
    facts["local_elements"] = sum(p.ds_tensor.numel() for p in model.parameters())
    facts["full_elements"] = sum(full_numel(p) for p in model.parameters())
    facts["config_vocab_size"] = model.llm.config.vocab_size
    facts["embedding_rows"] = model.llm.get_input_embeddings().num_embeddings
    facts["head_rows"] = model.llm.get_output_embeddings().out_features
    state = whole_state(model)
    reference = build_mllm(checkpoint, VOCAB, attn_implementation="sdpa", loss_impl="fused")
    reference.split_code_rows()
    expected = reference.state_dict()
    facts["keys_equal"] = sorted(state) == sorted(expected)
    facts["max_diff"] = {k: float((state[k] - expected[k]).abs().max()) for k in expected}
    facts["new_rows_std"] = float(state["llm.model.embed_tokens.code_rows"].std())

    # 2. The pitfalls, each one reproduced: an init on partitioned tables without gathering them,
    # and a fused loss reading the head weight outside the head's forward.
    cfg, ds = zero3_config()
    with construction_context(ds):
        llm = build_llm(checkpoint, attn_implementation="sdpa")
        try:
            extend_vocabulary(llm, VOCAB)
            facts["extend_without_gather"] = "no error"
        except RuntimeError as e:
            facts["extend_without_gather"] = str(e)
    hidden = torch.randn(3, llm.config.hidden_size, requires_grad=True)
    try:
        fused_linear_cross_entropy(hidden, llm.get_output_embeddings().weight, torch.tensor([1, 2, 3]), 2)
        facts["fused_on_shard"] = "no error"
    except ValueError as e:
        facts["fused_on_shard"] = str(e)

    # 3. A preset: transformers initialises it module by module on rank 0; all ranks hold rank 0's values.
    with construction_context(ds):
        torch.manual_seed(rank)  # different seeds: agreement can only come from rank 0's broadcast
        preset = build_mllm("tiny", VOCAB, attn_implementation="sdpa", gathered=gathered(3))
    preset_state = whole_state(preset)
    q = preset_state["llm.model.layers.0.self_attn.q_proj.weight"]
    facts["preset_q_std"] = float(q.std())
    checksum = torch.stack([v.double().sum() for v in preset_state.values()])
    gathered_sums = [torch.zeros_like(checksum) for _ in range(world)]
    torch.distributed.all_gather(gathered_sums, checksum)
    facts["preset_same_on_all_ranks"] = all(torch.equal(s, gathered_sums[0]) for s in gathered_sums)
    facts["preset_new_rows_std"] = float(preset_state["llm.model.embed_tokens.weight"][VOCAB.code_base:].std())

    # 4. The fused loss under ZeRO-3 against the chunked one: same losses, same weights after the steps.
    # Gradients are compared, step by step, rather than the weights after Adam: Adam divides by
    # the gradient's own scale, so elements whose gradients are rounding noise (~1e-9) move by a
    # whole learning rate in either direction whichever loss computed them.
    fused_losses, fused_grads = train(checkpoint, "fused")
    chunked_losses, chunked_grads = train(checkpoint, "chunked")
    facts["fused_losses"], facts["chunked_losses"] = fused_losses, chunked_losses
    facts["grad_names"] = sorted(chunked_grads[0])
    # step 1: the same weights and inputs in both runs (later steps start from weights that Adam
    # has already moved apart on those noise elements)
    f, c = fused_grads[0], chunked_grads[0]
    facts["fused_vs_chunked_grad_rel"] = {
        name: float((f[name] - c[name]).abs().max()) / max(float(c[name].abs().max()), 1e-12) for name in c
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
