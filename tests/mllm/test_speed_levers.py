"""Each training-speed lever computes the same loss and gradients as the plain path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm.config import load_config
from mllm.loss import chunked_linear_cross_entropy, fused_linear_cross_entropy
from mllm.model import checkpointed_layer_indices
from tests.mllm.test_model import assert_grads_close, grads, make_model, make_sample, pack
from viq.config import ConfigError


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(7)
    return pack([make_sample(gen, 30, (2, 3)), make_sample(gen, 25, None), make_sample(gen, 40, (3, 3))])


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out["loss_sum"] * 0.37).backward()  # a scale like the trainer's 1 / global token count
    return out["loss_sum"].detach(), grads(model)


def plain_reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_cross_entropy_matches_plain_value_and_gradients(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(300, 16, generator=gen) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=gen)
    expected = plain_reference(hidden, weight, targets)
    (expected * 2.5).backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8)  # 5 chunks, the last one short
    (got * 2.5).backward()
    assert got.dtype == torch.float32
    assert abs(float(got.detach()) - float(expected.detach())) <= tol * abs(float(expected.detach()))
    for actual, ref in ((hidden.grad, ref_h), (weight.grad, ref_w)):
        assert actual.dtype == dtype
        assert float((actual.float() - ref.float()).abs().max()) <= tol * float(ref.float().abs().max())


def test_fused_cross_entropy_without_grad_and_without_rows():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 8, generator=gen), torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (5,), generator=gen)
    with torch.no_grad():
        assert torch.allclose(fused_linear_cross_entropy(hidden, weight, targets, 2), plain_reference(hidden, weight, targets))
    w = weight.clone().requires_grad_()
    empty = fused_linear_cross_entropy(hidden[:0].requires_grad_(), w, targets[:0], 2)
    empty.backward()
    assert float(empty) == 0.0 and torch.equal(w.grad, torch.zeros_like(w))  # the weight is still used: same modules on every rank


def test_chunked_and_fused_agree_through_the_head_module():
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(9, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (9,), generator=gen)
    a = chunked_linear_cross_entropy(hidden, head, targets, 4)
    b = fused_linear_cross_entropy(hidden, head.weight, targets, 4)
    assert torch.allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("tied,split", [(True, False), (False, False), (True, True)])
def test_fused_loss_model_equals_chunked_model(batch, tied, split):
    models = []
    for impl in ("chunked", "fused"):
        m = make_model(seed=3, loss_impl=impl, tie_word_embeddings=tied, loss_chunk_size=16)
        if split:
            m.split_code_rows()
        models.append(m)
    (loss_a, grads_a), (loss_b, grads_b) = (loss_and_grads(m, batch) for m in models)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert_grads_close(grads_b, grads_a, rel=1e-5)


def test_selective_checkpointing_picks_spread_layers_and_keeps_gradients(batch):
    assert checkpointed_layer_indices(24, 0.5) == set(range(0, 24, 2))
    assert checkpointed_layer_indices(28, 0.25) == {0, 4, 8, 12, 16, 20, 24}
    assert checkpointed_layer_indices(2, 0.0) == set() and checkpointed_layer_indices(2, 1.0) == {0, 1}
    plain = make_model(seed=4)
    plain.train()
    loss_ref, grads_ref = loss_and_grads(plain, batch)
    for fraction, expected in ((1.0, 2), (0.5, 1)):
        m = make_model(seed=4)
        assert m.gradient_checkpointing_enable(fraction=fraction) == expected
        assert [layer.gradient_checkpointing for layer in m.llm.model.layers] == [True, fraction == 1.0]
        m.train()
        loss, g = loss_and_grads(m, batch)
        assert torch.equal(loss, loss_ref)
        assert_grads_close(g, grads_ref, rel=1e-6)
    with pytest.raises(ValueError, match="fraction must be in"):
        make_model().gradient_checkpointing_enable(fraction=1.5)


def test_compiled_decoder_layers_keep_loss_and_gradients(batch):
    plain = make_model(seed=5)
    loss_ref, grads_ref = loss_and_grads(plain, batch)
    compiled = make_model(seed=5)
    assert compiled.compile_decoder_layers() == 2
    for _ in range(2):  # the second call runs the already compiled graphs
        loss, g = loss_and_grads(compiled, batch)
        assert torch.allclose(loss, loss_ref, rtol=1e-5)
        assert_grads_close(g, grads_ref, rel=1e-4)


def test_speed_lever_config_errors():
    with pytest.raises(ConfigError, match="'model.loss_impl' is 'liger'; valid values: chunked, fused"):
        load_config(None, ["model.loss_impl=liger"])
    with pytest.raises(ConfigError, match="'model.checkpoint_fraction' must be in"):
        load_config(None, ["model.checkpoint_fraction=2"])
    cfg = load_config(None, ["model.loss_impl=fused", "model.compile_layers=true", "model.checkpoint_fraction=0.5"])
    assert (cfg.model.loss_impl, cfg.model.compile_layers, cfg.model.checkpoint_fraction) == ("fused", True, 0.5)
