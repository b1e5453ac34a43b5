import itertools
import math

import pytest
import torch

from viq.fsq import FSQ, codebook_stats

LEVEL_SETS = [[2], [3, 3], [8, 5, 5, 5], [8, 8, 8, 5, 5, 5], [2, 2, 2, 2, 2], [7, 4, 2]]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_round_trip_over_whole_codebook(levels):
    fsq = FSQ(levels)
    idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (fsq.codebook_size, len(levels))
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # quantising the code values themselves is the identity
    q, qi = fsq.quantize(codes)
    assert torch.equal(qi, idx)
    assert torch.allclose(q, codes)
    assert len(torch.unique(codes, dim=0)) == fsq.codebook_size


def test_index_convention_dimension_zero_least_significant():
    fsq = FSQ([8, 5, 3])
    digits = torch.tensor([[3, 2, 1]])
    codes = fsq.digits_to_codes(digits)
    assert int(fsq.codes_to_indices(codes)[0]) == 3 + 2 * 8 + 1 * 8 * 5
    assert torch.equal(fsq.indices_to_digits(torch.tensor([3 + 16 + 40])), digits)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_every_level_reachable_from_unit_interval(levels):
    fsq = FSQ(levels)
    z = torch.linspace(-1, 1, 1001)[:, None].expand(-1, len(levels))
    _, idx = fsq.quantize(z)
    digits = fsq.indices_to_digits(idx)
    for i, level in enumerate(levels):
        assert sorted(digits[:, i].unique().tolist()) == list(range(level))
    assert idx.min() >= 0 and idx.max() < math.prod(levels)


def test_tanh_bound_would_not_reach_all_levels():
    # The reason for the affine bound: tanh(z) * half_width on |z| <= 1 misses the extremes.
    half = (8 - 1) / 2
    reached = torch.round(torch.tanh(torch.linspace(-1, 1, 1001)) * half + half).unique()
    assert len(reached) < 8


def test_indices_in_range_for_any_input():
    fsq = FSQ([8, 5, 5, 5])
    _, idx = fsq.quantize(torch.randn(4096, 4) * 10)
    assert idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < fsq.codebook_size


def test_straight_through_gradient():
    fsq = FSQ([8, 5])
    z = (torch.rand(16, 2) * 1.8 - 0.9).requires_grad_()
    codes, _ = fsq.quantize(z)
    (codes * torch.arange(2.0)).sum().backward()
    half = torch.tensor([3.5, 2.0])
    # d(code)/dz = 1 through the STE (scale half then 1/half)
    assert torch.allclose(z.grad, torch.arange(2.0).expand(16, 2) * half / half)


def test_quantizes_in_fp32_under_bf16_input():
    fsq = FSQ([8, 8, 8, 5, 5, 5])
    z = torch.rand(2048, 6) * 2 - 1
    codes32, idx32 = fsq.quantize(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes_ac, idx_ac = fsq.quantize(z)
    assert codes_ac.dtype == torch.float32
    assert torch.equal(idx_ac, idx32)


def test_levels_validation_and_no_materialised_codebook():
    with pytest.raises(ValueError, match="levels must all be >= 2"):
        FSQ([1, 4])
    big = FSQ([4] * 16)  # 4^16 codes: must not allocate a codebook
    assert big.codebook_size == 4**16
    assert sum(b.numel() for b in big.buffers()) == 32
    codes = big.indices_to_codes(torch.tensor([0, 4**16 - 1]))
    assert torch.equal(codes[0], -torch.ones(16)) and torch.equal(codes[1], torch.ones(16))


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), 8)
    assert stats["codebook_usage"] == 2 / 8
    assert abs(stats["codebook_perplexity"] - 2.0) < 1e-6
    chunks = list(FSQ([3, 3]).iter_codebook(chunk=4))
    assert [s for s, _ in chunks] == [0, 4, 8] and sum(len(c) for _, c in chunks) == 9


def test_state_dict_has_no_computed_buffers():
    assert FSQ([8, 5]).state_dict() == {}


def test_l2_levels_all_pairs():
    fsq = FSQ([2, 2])
    seen = {tuple(fsq.quantize(torch.tensor([[a, b]]))[0][0].tolist()) for a, b in itertools.product([-1.0, 1.0], repeat=2)}
    assert len(seen) == 4
