import torch

from viq.attention import sdpa_varlen
from viq.rope import apply_rope, grid_positions, rope_2d_angles


def scores(q, k, qr, qc, kr, kc, head_dim):
    qa = apply_rope(q, rope_2d_angles(qr, qc, head_dim))
    ka = apply_rope(k, rope_2d_angles(kr, kc, head_dim))
    return torch.einsum("nhd,mhd->hnm", qa.double(), ka.double())


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    d = 32
    q, k = torch.randn(12, 2, d), torch.randn(12, 2, d)
    r, c = grid_positions(3, 4)
    base = scores(q, k, r, c, r, c, d)
    for dr, dc in [(5, 0), (0, 7), (3, 11), (0.5, 0.5)]:
        shifted = scores(q, k, r + dr, c + dc, r + dr, c + dc, d)
        assert torch.allclose(base, shifted, atol=1e-4)
    # a shift of only the keys changes the scores
    assert not torch.allclose(base, scores(q, k, r, c, r + 1, c, d), atol=1e-3)


def test_rows_and_columns_use_separate_halves():
    d = 16
    a_row = rope_2d_angles(torch.tensor([2.0]), torch.tensor([0.0]), d)
    a_col = rope_2d_angles(torch.tensor([0.0]), torch.tensor([2.0]), d)
    assert torch.all(a_row[0, d // 4 :] == 0) and torch.all(a_row[0, : d // 4] != 0)
    assert torch.all(a_col[0, : d // 4] == 0) and torch.all(a_col[0, d // 4 :] != 0)


def test_rotation_preserves_norm():
    x = torch.randn(6, 3, 16)
    y = apply_rope(x, rope_2d_angles(torch.arange(6.0), torch.arange(6.0) * 2, 16))
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)


def test_block_diagonal_attention_never_crosses_segments():
    torch.manual_seed(0)
    q, k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = sdpa_varlen(q, k, v, cu, cu)
    first = sdpa_varlen(q[:3], k[:3], v[:3], cu[:2], cu[:2])
    second = sdpa_varlen(q[3:], k[3:], v[3:], torch.tensor([0, 7], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32))
    assert torch.allclose(out, torch.cat([first, second]), atol=1e-6)


def test_long_packs_run_per_segment_with_same_result():
    torch.manual_seed(1)
    q, k, v = torch.randn(4200, 1, 8), torch.randn(4200, 1, 8), torch.randn(4200, 1, 8)
    cu = torch.tensor([0, 1000, 4100, 4200], dtype=torch.int32)
    looped = sdpa_varlen(q, k, v, cu, cu)
    for a, b in [(0, 1000), (1000, 4100), (4100, 4200)]:
        seg = torch.tensor([0, b - a], dtype=torch.int32)
        assert torch.allclose(looped[a:b], sdpa_varlen(q[a:b], k[a:b], v[a:b], seg, seg), atol=1e-5)
