"""Encode batching levers: size buckets and the mask-free attention of equal segments compute what
the masked varlen path computes."""
import pytest
import torch

from viq import ViQModel
from viq.attention import varlen_attention
from viq.encode_batching import plan_batches, uniform_attention


def test_plan_batches_keeps_the_budget_and_buckets_sizes():
    counts = [64, 16, 64, 16, 100, 16]
    assert plan_batches(counts, 100) == [[0, 1], [2, 3], [4], [5]]  # input order; an image over the budget goes alone
    assert plan_batches(counts, 100, bucket=True) == [[1, 3, 5], [0], [2], [4]]
    assert sorted(i for b in plan_batches(counts, 50, bucket=True) for i in b) == list(range(6))


def test_uniform_attention_equals_the_block_diagonal_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3 * 37, 4, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 37, 74, 111], dtype=torch.int32)
    expected = varlen_attention(q, k, v, cu, backend="sdpa")
    assert torch.allclose(uniform_attention(q, k, v, 37), expected, atol=1e-6)


def test_bucketed_mask_free_encode_gives_the_same_codes_in_input_order():
    model = ViQModel.from_pretrained("viq-tiny")
    gen = torch.Generator().manual_seed(1)
    pixels = [torch.randn(3, h, w, generator=gen) for h, w in [(112, 112), (56, 84), (112, 112), (56, 84), (28, 28)]]
    reference = [model.encode_pixels([p])[0] for p in pixels]  # one image per batch: nothing shared
    for block in model.vit.blocks:
        block.attn.uniform_dense = True
    model.config.max_tokens_per_batch = 64  # two same-size images per batch at most
    bucketed = model.encode_pixels(pixels, bucket=True)
    assert [tuple(c.shape) for c in bucketed] == [tuple(c.shape) for c in reference]
    for got, want in zip(bucketed, reference):
        assert torch.equal(got, want)


def test_encode_lever_benchmark_reports_each_lever_against_the_baseline():
    from mllm.bench.encode import run_encode_levers

    saved = []
    result = run_encode_levers("viq-tiny", "cpu", n_images=2, repeats=1, levers=["baseline", "bucketed_dense"],
                               cases=["256px_16x16"], on_result=saved.append)
    case = result["cases"]["256px_16x16"]
    assert set(case) == {"baseline", "bucketed_dense"} and len(saved) == 2  # written after every measurement
    assert 0.0 <= case["baseline"]["quantizer_share"] < 1.0 and case["baseline"]["tokens_per_s"] > 0
    assert case["bucketed_dense"]["codes_differing"] == 0.0  # same images, same codes: only the batching changed
    assert case["baseline"]["tokens_per_s"] / case["baseline"]["images_per_s"] == pytest.approx(256)  # 16 x 16 tokens
    with pytest.raises(ValueError, match="unknown encode lever.*'flex'.*valid on cpu: baseline"):
        run_encode_levers("viq-tiny", "cpu", levers=["flex"])
