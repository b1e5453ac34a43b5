"""vision.source codes vs online: the same code ids and the same loss for the same images."""
import torch

from data.dataset import ConversationDataset
from data.extract import cache_meta, extract_file
from data.packing import collate_packed
from data.shards import CodeStore
from data.tokenizer import build_tokenizer
from data.conversations import load_records
from mllm.model import build_mllm
from tests.fixtures import make_colour_dataset
from viq import ViQModel


def test_codes_and_online_give_identical_ids_and_loss(tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=6)
    viq = ViQModel.from_pretrained("viq-tiny")
    summary = extract_file(viq, "viq-tiny", str(train), str(tmp_path / "codes"), log=None)
    assert summary["images_encoded"] == 6 and summary["images_skipped"] == 0
    tokenizer, vocab = build_tokenizer("tiny", viq.config)
    records = load_records(train, train.parent)
    store = CodeStore(tmp_path / "codes", expected_meta=cache_meta(viq.config, "viq-tiny"))
    cached = ConversationDataset(records, tokenizer, vocab, source="codes", image_root=train.parent, code_store=store)
    online = ConversationDataset(records, tokenizer, vocab, source="online", image_root=train.parent,
                                 resize_policy=viq.config.resize_policy)
    assert len(cached) == len(online) == 6
    torch.manual_seed(0)
    model = build_mllm("tiny", vocab)
    for i in range(6):
        a, b = cached[i], online[i]
        assert cached.length(i) == online.length(i) == a["input_ids"].numel()
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        codes = torch.cat([c.reshape(-1, 4) for c in viq.encode_pixels(b["images"])])
        assert torch.equal(a["codes"], vocab.codes_to_ids(codes))
        b = {"input_ids": b["input_ids"], "labels": b["labels"], "codes": vocab.codes_to_ids(codes)}
        with torch.no_grad():
            la = model(collate_packed([a], 512, pad_to_capacity=False))["loss_sum"]
            lb = model(collate_packed([b], 512, pad_to_capacity=False))["loss_sum"]
        assert torch.equal(la, lb)


def test_missing_and_corrupt_images_are_counted_not_lost(tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=5)
    (train.parent / "images" / "001.png").write_bytes(b"\x89PNG broken")
    (train.parent / "images" / "003.png").unlink()
    viq = ViQModel.from_pretrained("viq-tiny")
    summary = extract_file(viq, "viq-tiny", str(train), str(tmp_path / "codes"), log=None)
    assert summary["images_encoded"] == 3 and summary["images_skipped"] == 2
    report = (tmp_path / "codes" / "skipped-rank000.jsonl").read_text().splitlines()
    assert len(report) == 2 and "001.png: cannot decode image" in report[0] and "003.png: image file not found" in report[1]
    tokenizer, vocab = build_tokenizer("tiny", viq.config)
    store = CodeStore(tmp_path / "codes")
    ds = ConversationDataset(load_records(train, train.parent), tokenizer, vocab, source="codes",
                             image_root=train.parent, code_store=store)
    assert len(ds) == 3 and ds.n_skipped == 2 and ds.skipped == {"codes missing from the cache": 2}
    # a rerun resumes: nothing new to encode, the same two are reported again
    again = extract_file(viq, "viq-tiny", str(train), str(tmp_path / "codes"), log=None)
    assert again["images_already_cached"] == 3 and again["images_encoded"] == 0


def test_extraction_as_two_ranks_then_merge_and_verify(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    train = make_colour_dataset(tmp_path / "d", n=7)
    out = tmp_path / "codes"
    for rank in (0, 1):
        proc = subprocess.run([sys.executable, "scripts/extract_codes.py", "--tokenizer", "viq-tiny", "--data", str(train),
                               "--out", str(out), "--rank", str(rank), "--world-size", "2"],
                              cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-1500:]
    merged = subprocess.run([sys.executable, "scripts/extract_codes.py", "--out", str(out), "--merge"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert json.loads(merged.stdout) == {"shards": 2, "records": 7}
    verified = subprocess.run([sys.executable, "scripts/extract_codes.py", "--out", str(out), "--verify"], cwd=repo,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True
    store = CodeStore(out)
    viq = ViQModel.from_pretrained("viq-tiny")
    first = viq.encode([str(train.parent / "images" / "003.png")])[0]
    assert torch.equal(store.get("images/003.png"), first)
    # damage a shard: --verify reports it and fails
    shard = sorted(out.glob("codes-001-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "scripts/extract_codes.py", "--out", str(out), "--verify"], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and shard.name in bad.stdout
