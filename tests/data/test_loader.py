import json

import numpy as np
import pytest
import torch

from data.loader import PackedLoader
from data.packing import IGNORE_INDEX
from data.vocab import IMAGE_PAD_ID


class TinyDataset:
    """Sample i: 2 text tokens, an image block on even i, text up to lengths[i]; codes tagged with i."""

    def __init__(self, lengths):
        self.lengths = [int(n) for n in lengths]

    def __len__(self):
        return len(self.lengths)

    def length(self, i):
        return self.lengths[i]

    def __getitem__(self, i):
        n = self.lengths[i]
        n_image = (n - 2) // 2 if i % 2 == 0 else 0
        ids = torch.full((n,), 7, dtype=torch.long)
        ids[0] = 100_000 + i  # identifies the sample in the packed row
        ids[2 : 2 + n_image] = IMAGE_PAD_ID
        labels = ids.clone()
        labels[: 2 + n_image] = IGNORE_INDEX
        sample = {"input_ids": ids, "labels": labels}
        if i % 2 == 0:
            sample["codes"] = torch.full((n_image, 4), i, dtype=torch.long)
        return sample


def tiny_lengths(n=300, seed=0, high=60):
    return np.random.default_rng(seed).integers(3, high, size=n).tolist()


def collect(loader, n=None):
    out = []
    it = iter(loader.iter_forever()) if n is not None else iter(loader)
    for batch in it:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["sample_indices"] == y["sample_indices"]
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens", "document_ids", "codes"):
            assert torch.equal(x[key], y[key]), key
        assert x["n_supervised"] == y["n_supervised"] and x["epoch"] == y["epoch"]


def test_batches_are_well_formed_and_match_the_samples():
    ds = TinyDataset(tiny_lengths())
    loader = PackedLoader(ds, 128, buffer_size=64, seed=3)
    for batch in loader:
        ids = batch["input_ids"][0]
        assert ids.shape == (128,)
        cu = batch["cu_seqlens"].tolist()
        starts = cu[: batch["n_samples"]]
        # Each segment starts with its sample's identifying token, in sample_indices order.
        assert [int(ids[s]) - 100_000 for s in starts] == batch["sample_indices"]
        assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)
        assert batch["n_real_tokens"] == sum(ds.lengths[i] for i in batch["sample_indices"])
        expected_codes = [i for i in batch["sample_indices"] if i % 2 == 0 for _ in range((ds.lengths[i] - 2) // 2)]
        assert batch["codes"][:, 0].tolist() == expected_codes
        assert int((ids == IMAGE_PAD_ID).sum()) == batch["codes"].shape[0]


def test_deterministic_given_seed_and_different_across_seeds_and_epochs():
    ds = TinyDataset(tiny_lengths())
    a = collect(PackedLoader(ds, 128, buffer_size=64, seed=5))
    b = collect(PackedLoader(ds, 128, buffer_size=64, seed=5))
    assert_same_batches(a, b)
    c = collect(PackedLoader(ds, 128, buffer_size=64, seed=6))
    assert [x["sample_indices"] for x in a] != [x["sample_indices"] for x in c]
    loader = PackedLoader(ds, 128, buffer_size=64, seed=5)
    e0, e1 = collect(loader), collect(loader)
    assert e1[0]["epoch"] == 1 and [x["sample_indices"] for x in e0] != [x["sample_indices"] for x in e1]


@pytest.mark.parametrize("micro_batch_packs", [1, 2])
def test_every_sample_exactly_once_per_epoch_across_ranks(micro_batch_packs):
    ds = TinyDataset(tiny_lengths(n=401, seed=1))
    per_rank = []
    for rank in range(3):
        loader = PackedLoader(
            ds, 128, buffer_size=50, seed=0, rank=rank, world_size=3, micro_batch_packs=micro_batch_packs, drop_last=False
        )
        batches = collect(loader)
        assert len(batches) == loader.steps_per_epoch == len(loader)
        per_rank.append([i for b in batches for i in b["sample_indices"]])
    flat = [i for r in per_rank for i in r]
    assert sorted(flat) == list(range(len(ds)))  # disjoint and covering
    assert all(set(per_rank[r]).isdisjoint(per_rank[s]) for r in range(3) for s in range(r + 1, 3))


def test_without_drop_last_the_last_group_is_completed_with_padding_packs():
    ds = TinyDataset([60] * 5)  # five packs of one sample for two ranks
    batches = [collect(PackedLoader(ds, 64, rank=r, world_size=2, drop_last=False)) for r in range(2)]
    assert [len(b) for b in batches] == [3, 3]
    fillers = [b for rank in batches for b in rank if b["n_samples"] == 0]
    assert len(fillers) == 1
    filler = fillers[0]
    assert filler["input_ids"].shape == (1, 64) and filler["n_supervised"] == 0 and filler["codes"].shape == (0, 4)
    assert bool((filler["labels"] == IGNORE_INDEX).all()) and filler["cu_seqlens"].tolist() == [0, 64]


def test_ranks_get_equal_batch_counts_and_drop_last_is_counted():
    ds = TinyDataset(tiny_lengths(n=401, seed=2))
    seen, counts = [], []
    for rank in range(2):
        loader = PackedLoader(ds, 128, buffer_size=50, seed=1, rank=rank, world_size=2, drop_last=True)
        batches = collect(loader)
        counts.append(len(batches))
        seen.append({i for b in batches for i in b["sample_indices"]})
    assert counts[0] == counts[1] == loader.steps_per_epoch
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0] | seen[1]) + loader.n_tail_dropped == len(ds)


def test_resume_yields_exactly_the_next_batches():
    ds = TinyDataset(tiny_lengths(n=200, seed=4))
    kwargs = dict(buffer_size=32, seed=11, rank=1, world_size=2, micro_batch_packs=2)
    straight_loader = PackedLoader(ds, 96, **kwargs)
    n = straight_loader.steps_per_epoch + 7  # crosses an epoch boundary
    straight = collect(straight_loader, n)

    first = PackedLoader(ds, 96, **kwargs)
    it = first.iter_forever()
    head = [next(it) for _ in range(n // 2)]
    state = json.loads(json.dumps(first.state_dict()))  # the trainer stores it as JSON
    # The state is global: rank 0 at the same step saves the very same state.
    rank0 = PackedLoader(ds, 96, **dict(kwargs, rank=0))
    it0 = rank0.iter_forever()
    for _ in range(n // 2):
        next(it0)
    assert rank0.state_dict() == state
    resumed = PackedLoader(ds, 96, **kwargs)
    resumed.load_state_dict(state)
    tail = collect(resumed, n - n // 2)
    assert_same_batches(straight, head + tail)
    assert resumed.stats.to_dict() == straight_loader.stats.to_dict()


def test_resume_at_every_point_of_an_epoch():
    ds = TinyDataset(tiny_lengths(n=120, seed=6))
    straight = collect(PackedLoader(ds, 100, buffer_size=16, seed=2))
    for cut in range(len(straight) + 1):
        loader = PackedLoader(ds, 100, buffer_size=16, seed=2)
        head = [loader.next_batch() for _ in range(cut)]
        resumed = PackedLoader(ds, 100, buffer_size=16, seed=2)
        resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
        assert [b["sample_indices"] for b in head + collect(resumed)] == [b["sample_indices"] for b in straight]


def test_state_from_other_settings_is_refused():
    ds = TinyDataset(tiny_lengths(n=50))
    state = PackedLoader(ds, 64, seed=1).state_dict()
    with pytest.raises(ValueError, match="loader state was saved with seed=1 but this loader has seed=2"):
        PackedLoader(ds, 64, seed=2).load_state_dict(state)
    other = TinyDataset(tiny_lengths(n=50, seed=9))
    with pytest.raises(ValueError, match="lengths_crc32"):
        PackedLoader(other, 64, seed=1).load_state_dict(state)


def test_overlong_samples_are_truncated_or_dropped_and_counted():
    lengths = [10, 300, 20, 30, 250, 5]
    ds = TinyDataset(lengths)
    loader = PackedLoader(ds, 100, buffer_size=8, overlong="truncate")
    batches = collect(loader)
    assert loader.stats.n_truncated == 2 and loader.stats.n_dropped == 0
    assert sorted(i for b in batches for i in b["sample_indices"]) == list(range(6))
    truncated = [b for b in batches if 1 in b["sample_indices"]][0]
    assert truncated["n_real_tokens"] == 100
    assert truncated["codes"].shape[0] == 0  # sample 1 is odd: no image
    sample4 = [b for b in batches if 4 in b["sample_indices"]][0]
    assert sample4["codes"].shape == (98, 4)  # image positions 2..99 of sample 4 survive the cut

    loader = PackedLoader(ds, 100, buffer_size=8, overlong="drop")
    batches = collect(loader)
    assert loader.stats.n_dropped == 2 and loader.stats.n_truncated == 0
    assert sorted(i for b in batches for i in b["sample_indices"]) == [0, 2, 3, 5]


def test_length_mismatch_is_reported():
    ds = TinyDataset([10, 12])
    ds.length = lambda i: 11 if i == 1 else 10
    loader = PackedLoader(ds, 64)
    with pytest.raises(ValueError, match=r"dataset.length\(1\) = 11 but dataset\[1\] has 12 tokens"):
        collect(loader)


def test_steps_per_epoch_matches_and_efficiency_is_high():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(300, 1700, 1500), rng.integers(20, 400, 1500)]).tolist()
    loader = PackedLoader(TinyDataset(lengths), 4096, buffer_size=256, seed=0)
    steps = loader.steps_per_epoch
    assert loader.estimate_steps_per_epoch() == pytest.approx(steps, rel=0.02)
    n = 0
    for batch in loader:
        n += 1
    assert n == steps
    assert loader.stats.efficiency > 0.99
    assert loader.stats.n_samples == len(lengths)
    packs, stats = loader.plan_epoch(0)
    assert stats.to_dict() == loader.stats.to_dict() and len(packs) == steps


def test_bench_data_script_reports_packing_loader_and_shards(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(root / "scripts/bench_data.py"), "--n-samples", "3000", "--n-images", "60", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    assert set(report["packing"]) == {"4096", "16384"}
    assert report["packing"]["4096"]["n_samples"] == 3000
    assert 0.9 < report["packing"]["4096"]["efficiency"] <= 1.0
    assert report["shards"]["n_images"] == 60 and report["shards"]["mean_compression_ratio"] == pytest.approx(294.0)
    assert report["loader"]["real_tokens"] > 0 and set(report["targets_met"]) == {
        "packing_4096_ge_0.98",
        "packing_16384_ge_0.995",
        "loader_ge_200k_tokens_per_s_per_core",
    }


def test_a_sample_cut_to_no_supervised_token_is_dropped_and_counted():
    """Sample 4 (250 tokens, supervision from position 126) cut to 100 would train on nothing."""
    class WithSupervision(TinyDataset):
        def first_supervised(self, i):
            return int(torch.nonzero(self[i]["labels"] != IGNORE_INDEX)[0])

    ds = WithSupervision([10, 300, 20, 30, 250, 5])
    assert ds.first_supervised(4) == 126 and ds.first_supervised(1) == 2
    loader = PackedLoader(ds, 100, buffer_size=8, overlong="truncate")
    batches = collect(loader)
    assert sorted(i for b in batches for i in b["sample_indices"]) == [0, 1, 2, 3, 5]
    assert loader.stats.n_unsupervised == 1 and loader.stats.n_truncated == 1 and loader.plan_epoch()[1].n_unsupervised == 1
    assert all(int(b["n_supervised"]) > 0 for b in batches)
