import random
import time

import pytest
import torch

from data.packing import (
    IGNORE_INDEX,
    PackingStats,
    collate_packed,
    concat_packed,
    pack_best_fit,
    plan_packs,
    resolve_max_seq_len,
    truncate_sample,
)
from data.vocab import ENDOFTEXT_ID, IMAGE_PAD_ID


def make_sample(n_text: int, n_image: int = 0, start: int = 1000, supervise_from: int = 0) -> dict:
    """Text tokens start, start+1, ... with n_image image positions in the middle; codes 0..4M-1."""
    text = torch.arange(start, start + n_text)
    half = n_text // 2
    ids = torch.cat([text[:half], torch.full((n_image,), IMAGE_PAD_ID), text[half:]])
    labels = ids.clone()
    labels[:supervise_from] = IGNORE_INDEX
    labels[ids == IMAGE_PAD_ID] = IGNORE_INDEX
    sample = {"input_ids": ids, "labels": labels}
    if n_image:
        sample["codes"] = torch.arange(start, start + 4 * n_image).reshape(n_image, 4)
    return sample


# ---------------------------------------------------------------- pack_best_fit


def test_best_fit_decreasing_hand_case_is_optimal():
    # Taken in input order this needs 3 packs ([2,6] [3,5] [4]); BFD finds the optimal 2.
    assert pack_best_fit([2, 6, 3, 5, 4], 10) == [[1, 4], [3, 2, 0]]


def test_best_fit_picks_the_tightest_pack_not_the_first():
    # After 7 | 5+4 the rooms are 3 and 1: the last item goes to the tighter second pack
    # (first-fit would put it into the first).
    assert pack_best_fit([7, 5, 4, 1], 10) == [[0], [1, 2, 3]]


def test_every_index_once_and_no_pack_over_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 4096) for _ in range(5000)]
    packs = pack_best_fit(lengths, 4096)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in p) for p in packs) <= 4096
    # BFD never leaves two packs that could be merged.
    loads = sorted(sum(lengths[i] for i in p) for p in packs)
    assert loads[0] + loads[1] > 4096


def test_pack_best_fit_rejects_items_outside_capacity():
    with pytest.raises(ValueError, match="item 1 has length 11"):
        pack_best_fit([3, 11], 10)
    with pytest.raises(ValueError, match="item 0 has length 0"):
        pack_best_fit([0], 10)


def test_pack_best_fit_is_fast_for_100k_items():
    rng = random.Random(1)
    lengths = [rng.randint(64, 2048) for _ in range(100_000)]
    t0 = time.perf_counter()
    packs = pack_best_fit(lengths, 16384)
    assert time.perf_counter() - t0 < 5.0
    assert sum(len(p) for p in packs) == 100_000


def test_plan_packs_truncate_and_drop_are_counted():
    lengths = [5, 12, 3, 20, 10]
    packs, stats = plan_packs(lengths, 10, overlong="truncate")
    assert stats.n_truncated == 2 and stats.n_dropped == 0 and stats.n_samples == 5
    assert sorted(i for p in packs for i in p) == [0, 1, 2, 3, 4]
    assert stats.n_real_tokens == 5 + 10 + 3 + 10 + 10
    assert stats.n_packs == 4
    assert stats.efficiency == pytest.approx(38 / 40)

    packs, stats = plan_packs(lengths, 10, overlong="drop")
    assert stats.n_dropped == 2 and stats.n_truncated == 0
    assert sorted(i for p in packs for i in p) == [0, 2, 4]
    assert stats.n_real_tokens == 18 and stats.n_packs == 2

    with pytest.raises(ValueError, match="unknown overlong policy 'cut'; valid: truncate, drop"):
        plan_packs(lengths, 10, overlong="cut")


def test_packing_stats_merge_and_round_trip():
    a = PackingStats(capacity=10, n_samples=3, n_packs=1, n_real_tokens=9)
    a.update(PackingStats(capacity=10, n_samples=2, n_packs=1, n_truncated=1, n_real_tokens=10))
    assert a.efficiency == pytest.approx(19 / 20)
    assert PackingStats.from_dict(a.to_dict()) == a


def test_resolve_max_seq_len():
    assert resolve_max_seq_len("4k") == 4096 and resolve_max_seq_len("16k") == 16384
    assert resolve_max_seq_len(8192) == 8192 and resolve_max_seq_len("2048") == 2048
    with pytest.raises(ValueError, match="valid: 4k, 16k"):
        resolve_max_seq_len("8k")


# ---------------------------------------------------------------- collate


def test_collate_positions_labels_segments_codes_and_padding():
    s0 = make_sample(4, n_image=3, start=100)
    s1 = make_sample(2, start=200)
    s2 = make_sample(3, n_image=2, start=300, supervise_from=2)
    batch = collate_packed([s0, s1, s2], capacity=16, pad_to_capacity=True, pad_id=ENDOFTEXT_ID)

    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0].tolist() == (
        [100, 101] + [IMAGE_PAD_ID] * 3 + [102, 103] + [200, 201] + [300] + [IMAGE_PAD_ID] * 2 + [301, 302] + [ENDOFTEXT_ID] * 2
    )
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2, 3, 4, 0, 1]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 7, 9, 14, 16]
    assert batch["seq_lens"].tolist() == [7, 2, 5, 2]
    assert batch["max_seqlen"] == 7
    assert batch["document_ids"][0].tolist() == [0] * 7 + [1] * 2 + [2] * 5 + [3] * 2

    labels = batch["labels"][0].tolist()
    # First token of every sample is -100 (so HF's global shift never crosses samples),
    # image positions are unsupervised, sample 2's first two are masked by its own labels,
    # padding is -100.
    I = IGNORE_INDEX
    assert labels == [I, 101, I, I, I, 102, 103] + [I, 201] + [I, I, I, 301, 302] + [I, I]
    assert batch["n_supervised"] == 6
    assert batch["n_supervised"] == sum(int((s["labels"][1:] != I).sum()) for s in (s0, s1, s2))
    assert batch["n_samples"] == 3 and batch["n_real_tokens"] == 14
    assert batch["packing_efficiency"] == pytest.approx(14 / 16)

    assert batch["codes"].tolist() == s0["codes"].tolist() + s2["codes"].tolist()
    # Inputs are not modified in place.
    assert s0["labels"][0] == 100


def test_collate_without_padding_has_no_tail_segment():
    batch = collate_packed([make_sample(3), make_sample(2)], capacity=16, pad_to_capacity=False)
    assert batch["input_ids"].shape == (1, 5)
    assert batch["cu_seqlens"].tolist() == [0, 3, 5]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert batch["codes"].shape == (0, 4)
    assert batch["packing_efficiency"] == 1.0


def test_collate_rejects_overflow_and_code_mismatch():
    with pytest.raises(ValueError, match="over the pack capacity 8"):
        collate_packed([make_sample(5), make_sample(4)], capacity=8)
    bad = make_sample(4, n_image=3)
    bad["codes"] = bad["codes"][:2]
    with pytest.raises(ValueError, match=r"sample 0: codes \(2, 4\) must be \[3, 4\]"):
        collate_packed([bad], capacity=16)


def test_concat_packed_micro_batch():
    a = collate_packed([make_sample(3, n_image=1, start=10), make_sample(2)], capacity=8)
    b = collate_packed([make_sample(4, n_image=2, start=50)], capacity=8)
    mb = concat_packed([a, b])
    assert mb["input_ids"].shape == (1, 16)
    assert mb["cu_seqlens"].tolist() == [0, 4, 6, 8, 14, 16]
    assert mb["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 0, 1, 2, 3, 4, 5, 0, 1]
    assert mb["document_ids"][0].tolist() == [0] * 4 + [1] * 2 + [2] * 2 + [3] * 6 + [4] * 2
    assert mb["codes"].tolist() == a["codes"].tolist() + b["codes"].tolist()
    assert mb["n_samples"] == 3 and mb["n_real_tokens"] == 12
    assert mb["n_supervised"] == a["n_supervised"] + b["n_supervised"]


def test_truncate_sample_keeps_codes_in_step():
    s = make_sample(6, n_image=4, start=10)  # ids: 10 11 12 P P P P 13 14 15
    t = truncate_sample(s, 5)
    assert t["input_ids"].tolist() == [10, 11, 12, IMAGE_PAD_ID, IMAGE_PAD_ID]
    assert t["codes"].tolist() == s["codes"][:2].tolist()
    assert truncate_sample(s, 10) is s
    with_images = dict(s, images=[torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="cuts into one of its 1 raw images"):
        truncate_sample(with_images, 5)
