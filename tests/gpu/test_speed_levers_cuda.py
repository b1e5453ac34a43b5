"""CUDA-only: the speed levers on the real GPU path (bf16, FlexAttention) keep loss and gradients."""
from types import SimpleNamespace

import importlib.util

import pytest
import torch

from data.packing import collate_packed
from data.vocab import CodeVocab
from mllm.kernels import apply_kernel_options
from mllm.model import build_mllm

pytestmark = pytest.mark.gpu
VOCAB = CodeVocab(text_vocab_size=151665, embedding_rows=151936, codebook_size=1000)


def packed_batch():
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in (300, 750, 230):
        ids = torch.randint(0, 150000, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 2] = -100
        samples.append({"input_ids": ids, "labels": labels})
    return {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collate_packed(samples, 1536).items()}


def loss_and_grads(**kwargs):
    torch.manual_seed(0)
    compile_layers = kwargs.pop("compile_layers", False)
    compile_mode = kwargs.pop("compile_mode", None)
    kernels = SimpleNamespace(kernels=kwargs.pop("kernels", "none"), fp8=kwargs.pop("fp8", False),
                              lora=SimpleNamespace(enabled=False))
    # float8 matmuls need dimensions divisible by 16: the tiny preset's are (64 wide, MLP 128)
    model = build_mllm("tiny", VOCAB, attn_implementation="flex_attention", dtype=torch.bfloat16, device="cuda",
                       num_hidden_layers=4, **kwargs)
    apply_kernel_options(model, kernels, zero_stage=1)
    if compile_layers:
        model.compile_decoder_layers(**({"mode": compile_mode} if compile_mode else {}))
    batch = packed_batch()
    for _ in range(3):  # later passes run compiled graphs (CUDA graphs are recorded on the second)
        model.zero_grad(set_to_none=True)
        out = model(batch)
        (out["loss_sum"] / out["n_supervised"]).backward()
    return out["loss_sum"].detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lever", [{"loss_impl": "fused"}, {"compile_layers": True},
                                   {"compile_layers": True, "compile_mode": "reduce-overhead"},
                                   pytest.param({"kernels": "liger"}, marks=pytest.mark.skipif(
                                       importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed"))])
def test_lever_matches_the_plain_bf16_step(lever):
    ref_loss, ref_grads = loss_and_grads()
    loss, grads = loss_and_grads(**lever)
    assert torch.allclose(loss, ref_loss, rtol=2e-2)
    for name, g in ref_grads.items():
        rel = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 5e-2, (name, rel)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None or not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (8, 9), reason="torchao float8 needs an H100/H200")
def test_fp8_linears_stay_close_to_bf16():
    ref_loss, ref_grads = loss_and_grads()
    loss, grads = loss_and_grads(fp8=True)
    assert torch.allclose(loss, ref_loss, rtol=5e-2)  # float8 rounding: a looser bound than bf16's
    rel = [float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ref_grads.items()]
    assert max(rel) < 0.25 and sorted(rel)[len(rel) // 2] < 0.1
