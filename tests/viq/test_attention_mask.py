"""The FlexAttention document mask built from segment boundaries equals create_block_mask's, without a dense mask."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from viq.attention import _segment_ids, document_block_mask, sdpa_varlen

LAYOUTS = [
    ([300, 5, 128, 256, 1000, 77], 1),  # segments crossing block edges, a 5-token one, a partial last block
    ([128, 128, 128], 1),  # exactly one block per segment: every block full
    ([1], 1),
    ([2000], 1),
    ([64, 1, 513, 128], 4),  # the quantiser's case: four queries per key
]


def cumulative(lengths, ratio=1):
    return (torch.tensor([0, *lengths]).cumsum(0) * ratio).to(torch.int32)


def listed(counts, indices):
    return [sorted(indices[0, 0, i, : counts[0, 0, i]].tolist()) for i in range(counts.shape[-1])]


@pytest.mark.parametrize("lengths,ratio", LAYOUTS)
def test_block_mask_equals_create_block_mask(lengths, ratio):
    cu_k, cu_q = cumulative(lengths), cumulative(lengths, ratio)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    seg_q, seg_k = _segment_ids(cu_q, tq), _segment_ids(cu_k, tk)
    expected = create_block_mask(lambda b, h, qi, ki: seg_q[qi] == seg_k[ki], None, None, tq, tk, device="cpu")
    got = document_block_mask(cu_q, cu_k, tq, tk)
    assert listed(got.kv_num_blocks, got.kv_indices) == listed(expected.kv_num_blocks, expected.kv_indices)
    assert listed(got.full_kv_num_blocks, got.full_kv_indices) == listed(expected.full_kv_num_blocks, expected.full_kv_indices)
    assert torch.equal(got.to_dense(), expected.to_dense())


@pytest.mark.parametrize("lengths,ratio", [LAYOUTS[0], LAYOUTS[4]])
def test_flex_with_the_block_mask_equals_block_diagonal_sdpa(lengths, ratio):
    gen = torch.Generator().manual_seed(0)
    cu_k, cu_q = cumulative(lengths), cumulative(lengths, ratio)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = torch.randn(tq, 2, 16, generator=gen), torch.randn(tk, 2, 16, generator=gen), torch.randn(tk, 2, 16, generator=gen)
    mask = document_block_mask(cu_q, cu_k, tq, tk)
    out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
    assert torch.allclose(out[0].transpose(0, 1), sdpa_varlen(q, k, v, cu_q, cu_k), atol=1e-5)
