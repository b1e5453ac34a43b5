import json
import os

import numpy as np
import pytest
import torch

from data.shards import (
    CodeStore,
    ShardError,
    ShardWriter,
    code_dtype,
    compression_ratio,
    done_keys,
    merge_manifests,
    verify,
)

META16 = {"levels": [8, 8, 8, 5, 5, 5], "codebook_size": 64000, "tokenizer": "viq-tiny"}
META32 = {"levels": [8, 8, 8, 8, 8, 8], "codebook_size": 262144, "tokenizer": "viq-big"}


def random_codes(seed: int, k: int, n: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        h, w = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        out[f"img/{seed}/{i:04d}.jpg"] = torch.randint(0, k, (h, w, 4), generator=g)
    return out


@pytest.mark.parametrize("meta,itemsize", [(META16, 2), (META32, 4)])
def test_round_trip_uint16_and_uint32(tmp_path, meta, itemsize):
    codes = random_codes(0, meta["codebook_size"])
    # The extreme values must survive the narrow dtype.
    codes["edge"] = torch.tensor([[[0, meta["codebook_size"] - 1, 1, meta["codebook_size"] - 2]]])
    with ShardWriter(tmp_path, rank=0, shard_bytes=600, meta=meta) as writer:
        for key, c in codes.items():
            writer.add(key, c)
    assert len(writer.shards_written) > 2  # small shard_bytes forces several shards
    manifest = merge_manifests(tmp_path)
    assert manifest["n_records"] == len(codes)

    store = CodeStore(tmp_path, expected_meta=meta)
    assert len(store) == len(codes) and sorted(store.keys()) == sorted(codes)
    for key, c in codes.items():
        got = store.get(key)
        assert got.dtype == torch.int64 and torch.equal(got, c)
        assert store.grid(key) == tuple(c.shape[:2])
        assert store.get_numpy(key).dtype.itemsize == itemsize
    total = sum(c.numel() * itemsize for c in codes.values())
    assert manifest["nbytes"] == total
    report = verify(tmp_path)
    assert report == {"ok": True, "n_shards": len(writer.shards_written), "n_records": len(codes), "nbytes": total, "errors": []}


def test_code_dtype_and_compression_ratio():
    assert code_dtype(65536) == np.dtype("<u2") and code_dtype(65537) == np.dtype("<u4")
    # 16 x 16 tokens of 4 uint16 codes = 2048 bytes vs 448 x 448 x 3 RGB bytes.
    assert compression_ratio(16, 16, 16 * 16 * 4 * 2) == pytest.approx(448 * 448 * 3 / 2048)


def test_killed_writer_leaves_no_listed_partial_shard_and_resume_skips_done(tmp_path):
    codes = random_codes(1, META16["codebook_size"], n=30)
    keys = list(codes)
    writer = ShardWriter(tmp_path, rank=0, shard_bytes=1000, meta=META16)
    n_added = 0
    # Stop with at least one complete shard and the next one half written.
    while not (writer.shards_written and any(n.endswith(".bin.tmp") for n in os.listdir(tmp_path))):
        writer.add(keys[n_added], codes[keys[n_added]])
        n_added += 1
    completed = list(writer.shards_written)
    del writer  # killed: never closed

    in_complete = set()
    for name in completed:
        with open(tmp_path / name.replace(".bin", ".idx.json")) as f:
            in_complete.update(json.load(f)["records"]["keys"])
    assert done_keys(tmp_path) == in_complete
    assert in_complete < set(keys[:n_added])
    assert any(name.endswith(".bin.tmp") for name in os.listdir(tmp_path))

    resumed = ShardWriter(tmp_path, rank=0, shard_bytes=1000, meta=META16)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # leftovers removed
    skipped = [k for k in keys if k in resumed]
    assert set(skipped) == in_complete
    for key in keys:
        if key not in resumed:
            resumed.add(key, codes[key])
    resumed.close()
    merge_manifests(tmp_path)
    store = CodeStore(tmp_path)
    assert sorted(store.keys()) == sorted(keys)
    for key in keys:
        assert torch.equal(store.get(key), codes[key])
    assert verify(tmp_path)["ok"]


def test_adding_a_done_key_is_refused(tmp_path):
    with ShardWriter(tmp_path, meta=META16) as writer:
        writer.add("a", torch.zeros(2, 2, 4, dtype=torch.long))
    writer = ShardWriter(tmp_path, meta=META16)
    with pytest.raises(ShardError, match="key 'a' is already stored"):
        writer.add("a", torch.zeros(2, 2, 4, dtype=torch.long))


def test_bad_codes_are_refused_with_the_key(tmp_path):
    writer = ShardWriter(tmp_path, meta=META16)
    with pytest.raises(ShardError, match=r"codes for key 'x' span \[0, 64000\], outside \[0, 64000\)"):
        writer.add("x", torch.tensor([[[0, 1, 2, 64000]]]))
    with pytest.raises(ShardError, match=r"codes for key 'y' have shape \(2, 3\); expected \[h, w, 4\]"):
        writer.add("y", torch.zeros(2, 3, dtype=torch.long))


def test_two_ranks_write_disjoint_shards_and_merge(tmp_path):
    codes = random_codes(2, META16["codebook_size"], n=24)
    keys = list(codes)
    w0 = ShardWriter(tmp_path, rank=0, shard_bytes=800, meta=META16)
    w1 = ShardWriter(tmp_path, rank=1, shard_bytes=800, meta=META16)
    for i, key in enumerate(keys):  # interleaved, as two processes would
        (w0 if i % 2 == 0 else w1).add(key, codes[key])
    names0, names1 = w0.close(), w1.close()
    assert all(n.startswith("codes-000-") for n in names0) and all(n.startswith("codes-001-") for n in names1)
    manifest = merge_manifests(tmp_path)
    assert [s["name"] for s in manifest["shards"]] == sorted(names0 + names1)
    store = CodeStore(tmp_path)
    assert len(store) == 24
    for key in keys:
        assert torch.equal(store.get(key), codes[key])


def test_merge_refuses_a_key_written_by_two_ranks(tmp_path):
    for rank in (0, 1):
        with ShardWriter(tmp_path, rank=rank, meta=META16) as w:
            w.add(f"only-{rank}", torch.zeros(1, 1, 4, dtype=torch.long))
    # A second rank that did not see the other's shard (started at the same time).
    with open(tmp_path / "codes-001-00000.idx.json") as f:
        index = json.load(f)
    index["records"]["keys"] = ["only-0"]
    with open(tmp_path / "codes-001-00000.idx.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(ShardError, match="key 'only-0' is stored twice: in codes-000-00000.bin and codes-001-00000.bin"):
        merge_manifests(tmp_path)


def _one_shard_cache(tmp_path):
    codes = random_codes(3, META16["codebook_size"], n=5)
    with ShardWriter(tmp_path, meta=META16) as w:
        for key, c in codes.items():
            w.add(key, c)
    merge_manifests(tmp_path)
    return codes, tmp_path / "codes-000-00000.bin"


def test_truncated_shard_is_a_one_line_error_naming_the_file(tmp_path):
    _, shard = _one_shard_cache(tmp_path)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(ShardError) as err:
        CodeStore(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(shard) in msg and f"{size - 3} bytes on disk but its index needs {size}" in msg
    report = verify(tmp_path)
    assert not report["ok"] and report["errors"][0] == f"{shard}: {size - 3} bytes on disk, index says {size}"


def test_flipped_byte_is_a_one_line_error_naming_file_and_key(tmp_path):
    codes, shard = _one_shard_cache(tmp_path)
    keys = list(codes)
    with open(tmp_path / "codes-000-00000.idx.json") as f:
        index = json.load(f)
    victim = keys[2]
    records = index["records"]
    offset = records["offset"][records["keys"].index(victim)]
    data = bytearray(shard.read_bytes())
    data[offset + 1] ^= 0x10
    shard.write_bytes(bytes(data))

    store = CodeStore(tmp_path)
    assert torch.equal(store.get(keys[0]), codes[keys[0]])  # other records still read
    with pytest.raises(ShardError) as err:
        store.get(victim)
    msg = str(err.value)
    assert "\n" not in msg and str(shard) in msg and repr(victim) in msg and "checksum mismatch" in msg
    report = verify(tmp_path)
    assert report["errors"] == [f"{shard}: sha256 differs from manifest.json", f"{shard}: checksum mismatch for key {victim!r}"]


def test_mismatched_meta_is_refused(tmp_path):
    _one_shard_cache(tmp_path)
    other = dict(META16, tokenizer="viq-base")
    with pytest.raises(ShardError, match="'tokenizer' is 'viq-tiny', expected 'viq-base'"):
        CodeStore(tmp_path, expected_meta=other)
    with pytest.raises(ShardError, match="cache was written with other settings: 'tokenizer' is 'viq-tiny', expected 'viq-base'"):
        ShardWriter(tmp_path, rank=1, meta=other)
    with pytest.raises(ShardError, match="multiply to 64000, not codebook_size 1000"):
        ShardWriter(tmp_path / "new", meta={"levels": [8, 8, 8, 5, 5, 5], "codebook_size": 1000})


def test_missing_manifest_says_what_to_run(tmp_path):
    with ShardWriter(tmp_path, meta=META16) as w:
        w.add("a", torch.zeros(1, 1, 4, dtype=torch.long))
    with pytest.raises(ShardError, match="manifest.json is missing: run merge_manifests"):
        CodeStore(tmp_path)


def test_store_survives_pickling_for_worker_processes(tmp_path):
    import pickle

    codes, _ = _one_shard_cache(tmp_path)
    store = CodeStore(tmp_path)
    key = next(iter(codes))
    store.get(key)  # opens a memory map
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.get(key), codes[key])


def test_an_exception_inside_the_writer_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_bytes=100, meta=META16) as w:
            w.add("a", torch.zeros(4, 4, 4, dtype=torch.long))  # 128 bytes: completes a shard
            w.add("b", torch.zeros(1, 1, 4, dtype=torch.long))
            raise RuntimeError("encoder failed")
    assert done_keys(tmp_path) == {"a"}
    merge_manifests(tmp_path)
    assert CodeStore(tmp_path).keys() == ["a"]
