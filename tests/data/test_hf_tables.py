"""The one save_to_disk reader that training data (data.conversations) and benchmarks (eval.data) share."""
from __future__ import annotations

import json

import pytest

from data.hf_tables import is_save_to_disk, read_save_to_disk
from eval.data import read_hf_rows
from viq.errors import DataError

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    train = datasets.Dataset.from_dict({"index": [0, 1, 2], "question": ["a?", "b?", "c?"]})
    test = datasets.Dataset.from_dict({"index": [7], "question": ["z?"]})
    # Two shards, so the reader must concatenate the files state.json lists, in order.
    train.save_to_disk(str(root / "ds"), num_shards=2)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "dd"))
    return root


def test_reads_a_real_save_to_disk_folder_as_datasets_does(saved):
    assert is_save_to_disk(saved / "ds") and is_save_to_disk(saved / "dd") and not is_save_to_disk(saved)
    table = read_save_to_disk(saved / "ds")
    assert table.to_pylist() == datasets.load_from_disk(str(saved / "ds")).data.table.to_pylist()
    assert [r["index"] for r in read_hf_rows(saved / "ds")] == [0, 1, 2]


def test_a_dataset_dict_split_and_the_errors_that_name_the_fix(saved):
    assert read_save_to_disk(saved / "dd", "test").to_pylist() == [{"index": 7, "question": "z?"}]
    assert [r["question"] for r in read_hf_rows(saved / "dd", split="train")] == ["a?", "b?", "c?"]
    with pytest.raises(DataError, match=rf"^{saved / 'dd'}: a DatasetDict with splits train, test; choose one with split="):
        read_hf_rows(saved / "dd")
    with pytest.raises(DataError, match="there is no split 'val'; choose one with --split"):
        read_save_to_disk(saved / "dd", "val", split_option="--split")


def test_damaged_folders_name_the_file(saved, tmp_path):
    state = json.loads((saved / "ds" / "state.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text(json.dumps(state))
    first = state["_data_files"][0]["filename"]
    with pytest.raises(DataError, match=rf"^{broken / first}: Arrow file not found"):
        read_save_to_disk(broken)
    (broken / first).write_bytes(b"not arrow")
    with pytest.raises(DataError, match=rf"^{broken / first}: not an Arrow stream file"):
        read_save_to_disk(broken)
    (broken / "state.json").write_text('{"_data_files": ')
    with pytest.raises(DataError, match=rf"^{broken / 'state.json'}:1:\d+: invalid JSON"):
        read_save_to_disk(broken)
