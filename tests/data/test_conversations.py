"""Conversation readers (JSON, JSONL, parquet, save_to_disk), their errors, and mixtures."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.conversations import (
    RecordError,
    detect_format,
    load_mixture,
    load_records,
    mixture_order,
    open_image,
    samples_per_source,
)
from viq.config import ConfigError
from viq.errors import DataError

REPO = Path(__file__).resolve().parents[2]

RECORDS = [
    {"id": "a", "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"}]},
    {"id": "b", "image": ["x.png", "y.png"], "conversations": [
        {"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "Same"}]},
    {"id": "c", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]


def png_bytes(colour=(255, 0, 0), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def check_records(records, root):
    assert [r.id for r in records] == ["a", "b", "c"]
    assert records[0].images == [str(Path(root) / "img/a.png")]
    assert records[1].images == [str(Path(root) / "x.png"), str(Path(root) / "y.png")]
    assert records[2].images == []
    assert records[2].conversations[0] == {"from": "system", "value": "Be brief."}
    assert records[0].conversations[1] == {"from": "gpt", "value": "Red"}


def test_json_and_jsonl_read_the_same_records(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    check_records(load_records(tmp_path / "d.json", image_root="/imgs"), "/imgs")
    check_records(load_records(tmp_path / "d.jsonl", image_root="/imgs"), "/imgs")
    assert detect_format(tmp_path / "d.jsonl") == "jsonl" and detect_format(tmp_path / "d.json") == "json"


def test_absolute_image_paths_are_kept(tmp_path):
    record = {"id": 7, "image": "/abs/p.png", "conversations": RECORDS[0]["conversations"]}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    [loaded] = load_records(tmp_path / "d.json", image_root="/elsewhere")
    assert loaded.images == ["/abs/p.png"] and loaded.id == "7"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[2]) + "\n{\"id\": \"x\", oops}\n")
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON") as info:
        load_records(path)
    assert "\n" not in str(info.value)


def test_malformed_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    with pytest.raises(DataError, match=rf"^{path}:3:\d+: invalid JSON"):
        load_records(path)


def test_missing_conversations_and_bad_role_name_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORDS[0], {"id": "nope", "image": "a.png"}]))
    with pytest.raises(RecordError, match=rf"^{path}: record 1 \(id=nope\): missing 'conversations'"):
        load_records(path)
    bad_role = {"id": "r", "conversations": [{"from": "robot", "value": "x"}]}
    path.write_text(json.dumps([bad_role]))
    with pytest.raises(RecordError, match=r"record 0 \(id=r\): turn 0 has role 'robot'; valid roles: human"):
        load_records(path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(bad_role) + "\n")
    with pytest.raises(RecordError, match=rf"^{jsonl}:2: turn 0 has role 'robot'"):
        load_records(jsonl)


def test_placeholder_count_must_match_images(tmp_path):
    path = tmp_path / "d.json"
    record = {"id": "m", "image": ["a.png"], "conversations": RECORDS[1]["conversations"]}
    path.write_text(json.dumps([record]))
    with pytest.raises(RecordError, match=r"record 0 \(id=m\): 2 '<image>' placeholder\(s\) but 1 image"):
        load_records(path)


def test_parquet_with_embedded_and_path_images(tmp_path):
    image = png_bytes((0, 128, 255))
    table = pa.table({
        "id": ["p0", "p1"],
        "image": [{"bytes": image, "path": "p0.png"}, {"bytes": None, "path": "rel/p1.png"}],
        "conversations": [RECORDS[0]["conversations"], RECORDS[0]["conversations"]],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    records = load_records(tmp_path / "d.parquet", image_root=tmp_path)
    assert records[0].images == [image]
    assert records[1].images == [str(tmp_path / "rel/p1.png")]
    assert open_image(records[0].images[0]).getpixel((0, 0)) == (0, 128, 255)
    # A folder of parquet shards reads in file-name order.
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(1, 1), folder / "part-1.parquet")
    pq.write_table(table.slice(0, 1), folder / "part-0.parquet")
    assert [r.id for r in load_records(folder)] == ["p0", "p1"]


def test_parquet_without_conversations_column(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(RecordError, match="no 'conversations' column \\(columns: id, text\\)"):
        load_records(tmp_path / "d.parquet")


def test_hf_save_to_disk_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
    })
    image = png_bytes((10, 200, 30))
    ds = datasets.Dataset.from_dict(
        {"id": ["h0"], "image": [{"bytes": image, "path": None}], "conversations": [RECORDS[0]["conversations"]]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert detect_format(tmp_path / "ds") == "hf"
    [record] = load_records(tmp_path / "ds")
    assert record.id == "h0" and open_image(record.images[0]).getpixel((3, 3)) == (10, 200, 30)
    assert record.conversations == RECORDS[0]["conversations"]
    # A DatasetDict needs a split.
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError, match="a DatasetDict with splits train; choose one with the source's 'split' key"):
        load_records(tmp_path / "dd")
    assert load_records(tmp_path / "dd", split="train")[0].id == "h0"


def test_mixture_yaml_resolves_paths_and_rejects_unknown_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    yaml_path = tmp_path / "sub" / "mix.yaml"
    yaml_path.write_text(
        "root: ..\nsources:\n"
        "  - {path: a.jsonl, image_root: imgs, weight: 2}\n"
        "  - {path: /abs/b.json, weight: 0.5, format: json}\n"
    )
    mixture = load_mixture(yaml_path)
    assert mixture.sources[0].path == str(tmp_path / "sub" / ".." / "a.jsonl")
    assert mixture.sources[0].image_root == str(tmp_path / "sub" / ".." / "imgs")
    assert mixture.sources[1].path == "/abs/b.json" and mixture.sources[1].image_root is None
    assert mixture.weights == [2.0, 0.5]
    yaml_path.write_text("sources:\n  - {path: a.jsonl, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sources\[0\]\.wieght'; valid keys.*weight"):
        load_mixture(yaml_path)
    yaml_path.write_text("sources:\n  - {path: a.jsonl, format: csv}\n")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.format 'csv' is not one of json, jsonl, parquet, hf"):
        load_mixture(yaml_path)
    yaml_path.write_text("source: []\n")
    with pytest.raises(ConfigError, match="unknown key 'source'; valid keys: root, sources"):
        load_mixture(yaml_path)


def test_example_mixture_configs_parse():
    for name in ("synthetic_mixture.yaml", "llava_onevision_example.yaml"):
        mixture = load_mixture(REPO / "configs" / "data" / name)
        assert mixture.sources and all(s.weight > 0 for s in mixture.sources)
    synthetic = load_mixture(REPO / "configs" / "data" / "synthetic_mixture.yaml").sources[0]
    assert Path(synthetic.path).resolve() == REPO / "runs" / "data" / "synthetic" / "train.jsonl"


def test_samples_per_source_is_exact():
    assert samples_per_source([10, 10, 10], [1, 1, 1], 10) == [4, 3, 3]
    assert samples_per_source([5, 100], [3, 1], 8) == [6, 2]
    assert samples_per_source([5, 100], [1, 0], 8) == [8, 0]
    with pytest.raises(ValueError, match="source 1 has weight 1.0 but no records"):
        samples_per_source([5, 0], [1, 1], 8)


def test_mixture_order_proportions_and_determinism():
    sizes, weights = [100, 300, 50], [2.0, 1.0, 1.0]
    order = mixture_order(sizes, weights, seed=7, epoch=0)
    assert order.shape == (450, 2) and order.dtype == np.int64
    counts = np.bincount(order[:, 0], minlength=3).tolist()
    assert counts == [225, 112, 113] or counts == [225, 113, 112]
    assert counts == samples_per_source(sizes, weights, 450)
    assert np.array_equal(order, mixture_order(sizes, weights, seed=7, epoch=0))
    assert not np.array_equal(order, mixture_order(sizes, weights, seed=8, epoch=0))
    assert not np.array_equal(order, mixture_order(sizes, weights, seed=7, epoch=1))
    for source, size in enumerate(sizes):
        assert order[order[:, 0] == source, 1].max() < size
    # Up-weighted source 0 (225 draws of 100): every record twice before any third time.
    per_record = np.bincount(order[order[:, 0] == 0, 1], minlength=100)
    assert per_record.min() == 2 and per_record.max() == 3
    # The order is interleaved, not source blocks.
    assert len(set(order[:20, 0].tolist())) > 1


def test_down_weighted_source_is_covered_across_epochs():
    sizes, weights = [100, 10], [1.0, 1.0]
    seen = set()
    for epoch in range(2):
        rows = mixture_order(sizes, weights, seed=3, epoch=epoch, samples_per_epoch=100)
        big = rows[rows[:, 0] == 0, 1]
        assert len(big) == 50 and len(set(big.tolist())) == 50
        seen |= set(big.tolist())
    assert seen == set(range(100))
