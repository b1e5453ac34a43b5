"""The synthetic data set: determinism, splits, LLaVA records and VLMEvalKit TSVs."""
from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data.conversations import load_records
from data.synthetic import COLOURS, make_sample, mcq_prompt, vqa_prompt, make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
csv.field_size_limit(1 << 30)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    start = time.perf_counter()
    summary = make_synthetic_dataset(out, 200, seed=5, val_fraction=0.25)
    return out, summary, time.perf_counter() - start


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_tsv(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        return reader.fieldnames, list(reader)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fast_and_split_as_asked(dataset):
    out, summary, seconds = dataset
    assert seconds < 20  # a few seconds on a laptop core; generous for slow CI
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert (len(train), len(val)) == (150, 50) == (summary["train"], summary["val"])
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == 200
    assert len(list((out / "images").glob("*.png"))) == 200
    assert sum(summary["val_per_benchmark"].values()) == 50


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    out, _, _ = dataset
    again = make_synthetic_dataset(tmp_path / "again", 200, seed=5, val_fraction=0.25)
    assert again["val_per_benchmark"] == json.loads((out / "meta.json").read_text())["val_per_benchmark"]
    first, second = all_files(out), all_files(tmp_path / "again")
    first.pop("meta.json"), second.pop("meta.json")  # holds the output path
    assert first == second
    make_synthetic_dataset(tmp_path / "other", 30, seed=6, val_fraction=0.0)
    assert (tmp_path / "other" / "images" / "synth_chart_000000.png").read_bytes() != first["images/synth_chart_000000.png"]
    # Sample i does not depend on how many samples are drawn.
    assert (tmp_path / "again" / "images" / "synth_doc_000001.png").read_bytes() == first["images/synth_doc_000001.png"]


def test_llava_records_are_valid_and_varied(dataset):
    out, _, _ = dataset
    records = load_records(out / "train.jsonl", image_root=out)
    sizes = set()
    for record in records:
        assert len(record.images) == 1 and Path(record.images[0]).is_file()
        human, gpt = record.conversations
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and 0 < len(gpt["value"]) <= 12 and " " not in gpt["value"]
        with Image.open(record.images[0]) as image:
            assert 112 <= image.width <= 448 and 112 <= image.height <= 448 and image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) > 50 and any(w > 1.5 * h for w, h in sizes) and any(h > 1.5 * w for w, h in sizes)
    categories = {json.loads(line)["category"] for line in (out / "train.jsonl").read_text().splitlines()}
    assert {"bar_value", "line_value", "receipt_total", "count_shape"} <= categories


def test_vlmeval_tsvs_decode_to_the_validation_images(dataset):
    out, _, _ = dataset
    val = read_jsonl(out / "val.jsonl")
    val_pngs = {r["id"].split("_")[1]: set() for r in val}
    for r in val:
        val_pngs[r["id"].split("_")[1]].add((out / r["image"]).read_bytes())
    for family, name in (("chart", "SYNTH_CHART"), ("doc", "SYNTH_DOC"), ("shapes", "SYNTH_SHAPES")):
        columns, rows = read_tsv(out / "vlmeval" / f"{name}.tsv")
        expected = ["index", "image", "question"] + (["A", "B", "C", "D"] if family == "shapes" else [])
        assert columns == expected + ["answer", "category"]
        assert [int(r["index"]) for r in rows] == list(range(len(rows)))
        pngs = [base64.b64decode(r["image"]) for r in rows]
        assert set(pngs) == val_pngs.get(family, set()) and len(pngs) == len(val_pngs.get(family, ()))
        for png in pngs:
            with Image.open(io.BytesIO(png)) as image:
                assert image.format == "PNG" and image.size[0] >= 112
        for r in rows:
            assert r["answer"] and "\n" not in r["question"]
            if family == "shapes":
                assert r["answer"] in "ABCD" and len({r[k] for k in "ABCD"}) == 4


def test_training_prompt_matches_tsv_question(dataset):
    out, _, _ = dataset
    val = read_jsonl(out / "val.jsonl")
    _, shapes = read_tsv(out / "vlmeval" / "SYNTH_SHAPES.tsv")
    _, charts = read_tsv(out / "vlmeval" / "SYNTH_CHART.tsv")
    shape_prompts = ["<image>\n" + mcq_prompt(r["question"], [r[k] for k in "ABCD"]) for r in shapes]
    chart_prompts = ["<image>\n" + vqa_prompt(r["question"]) for r in charts]
    assert shape_prompts == [r["conversations"][0]["value"] for r in val if "_shapes_" in r["id"]]
    assert chart_prompts == [r["conversations"][0]["value"] for r in val if "_chart_" in r["id"]]
    assert [r["answer"] for r in shapes] == [r["conversations"][1]["value"] for r in val if "_shapes_" in r["id"]]


def test_prompts_are_vlmevalkit_defaults():
    assert mcq_prompt("How many?", ["1", "2", "3", "4"]) == (
        "Question: How many?\nOptions:\nA. 1\nB. 2\nC. 3\nD. 4\n"
        "Please select the correct answer from the options above. \n"
    )
    assert vqa_prompt("What is the total?") == "What is the total?\nAnswer the question using a single word or phrase."


def test_answers_are_verifiable_from_pixels_and_text():
    checked = {"colour_of": 0, "receipt_total": 0}
    for index in range(2, 400, 3):  # shapes samples
        sample = make_sample(11, index)
        if sample.category == "colour_of":
            colour = sample.options["ABCD".index(sample.answer)]
            present = {c for c in COLOURS if COLOURS[c] in {rgb for _, rgb in sample.image.getcolors(1 << 20)}}
            assert colour in present
            checked["colour_of"] += 1
    for index in range(1, 400, 3):  # document samples
        sample = make_sample(11, index)
        if sample.category == "receipt_total":
            assert float(sample.answer) > 0 and len(sample.answer.split(".")[1]) == 2
            checked["receipt_total"] += 1
    assert all(count > 5 for count in checked.values())


def test_script_runs_and_rejects_bad_arguments(tmp_path):
    script = REPO / "scripts" / "make_synthetic_data.py"
    ok = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "s"), "--n", "6", "--seed", "3"],
                        capture_output=True, text=True, check=True)
    assert json.loads(ok.stdout)["n"] == 6 and (tmp_path / "s" / "train.jsonl").is_file()
    bad = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "b"), "--n", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--n must be positive, got 0" in bad.stderr


def test_records_become_training_samples(dataset, tmp_path):
    from data.chat import IGNORE_INDEX, build_sample
    from data.tokenizer import build_tokenizer

    out, _, _ = dataset
    tokenizer, vocab = build_tokenizer("tiny", 1000, cache_dir=tmp_path)
    for record in load_records(out / "val.jsonl", image_root=out)[:20]:
        with Image.open(record.images[0]) as image:
            grid = (image.height // 28, image.width // 28)
        sample = build_sample(tokenizer, vocab, record.conversations, [grid])
        assert sample["n_image_tokens"] == grid[0] * grid[1]
        supervised = sample["labels"][sample["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == record.conversations[1]["value"] + "<|im_end|>\n"


def test_a_set_drawn_with_other_settings_is_refused_not_reused(tmp_path):
    from data.prepare import check_synthetic_set
    from mllm.config import load_config
    from viq.errors import ConfigError

    root = tmp_path / "synthetic"
    make_synthetic_dataset(root, 6, seed=0)
    check_synthetic_set(load_config(None, [f"data.root={root}", "data.synthetic_n=6"]))  # the same set: used
    with pytest.raises(ConfigError) as e:
        check_synthetic_set(load_config(None, [f"data.root={root}", "data.synthetic_n=12", "trainer.seed=3"]))
    assert str(e.value) == (f"{root} holds another synthetic set (data.synthetic_n is 12, the set's is 6; trainer.seed is 3, "
                            f"the set's is 0): set data.root to a new folder (the set is generated there) or delete {root}")
    # a data.train file of one's own is never compared with the demo set's description
    check_synthetic_set(load_config(None, [f"data.root={root}", "data.synthetic_n=12", f"data.train={root / 'train.jsonl'}"]))
