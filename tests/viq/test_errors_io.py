"""viq.errors.run_cli and viq.io: one-line user errors, atomic writes, readers that name file:line."""
import json
import os

import pytest

from viq.config import ConfigError, read_json_config
from viq.errors import DataError, MissingFileError, UserError, run_cli
from viq.io import atomic_write, atomic_write_json, iter_jsonl, read_json, read_jsonl_objects, read_yaml


def test_user_error_is_one_line_with_the_exit_code(capsys, monkeypatch):
    monkeypatch.delenv("VIQ_DEBUG", raising=False)

    def bad_input():
        raise DataError("records.jsonl:3: invalid JSON\nsecond line never shown")

    assert run_cli(bad_input, "prog") == 1
    assert run_cli(bad_input, "prog", exit_code=2) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["prog: error: records.jsonl:3: invalid JSON (VIQ_DEBUG=1 shows the traceback)"] * 2


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch):
    with pytest.raises(KeyError):
        run_cli(lambda: {}["missing"])
    monkeypatch.setenv("VIQ_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(lambda: (_ for _ in ()).throw(MissingFileError("x: not found")))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})

    def half_written(handle):
        handle.write(b'{"step": 2, "cur')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, half_written)
    assert json.loads(target.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind
    atomic_write(target, "text\n")
    atomic_write(tmp_path / "raw.bin", b"\x00\x01")
    assert target.read_text() == "text\n" and (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["raw.bin", "state.json"]


def test_readers_name_file_and_line_of_truncated_json(tmp_path):
    doc = tmp_path / "config.json"
    doc.write_text('{\n  "a": 1,\n  "b": [1, 2')
    with pytest.raises(DataError, match=rf"^{doc}:3:\d+: invalid JSON"):
        read_json(doc)
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ')
    with pytest.raises(DataError, match=rf"^{lines}:4: invalid JSON"):
        list(iter_jsonl(lines))
    lines.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match=rf"^{lines}:2: expected a JSON object, got list"):
        read_jsonl_objects(lines)
    with pytest.raises(MissingFileError, match=rf"^{tmp_path / 'none.json'}: JSON file not found"):
        read_json(tmp_path / "none.json")


def test_readers_name_file_and_line_of_undecodable_bytes(tmp_path):
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes('{"a": "ok"}\n{"a": "caf\u00e9"}\n{"a": "'.encode() + b"\xff\xfe" + b'"}\n')
    with pytest.raises(DataError, match=rf"^{lines}:3: not UTF-8 text \(byte 0xff at offset \d+\)"):
        list(iter_jsonl(lines))
    doc = tmp_path / "doc.json"
    doc.write_bytes(b'{"a":\n "\xe9"}')
    with pytest.raises(DataError, match=rf"^{doc}:2: not UTF-8 text \(byte 0xe9"):
        read_json(doc)


def test_a_damaged_saved_config_is_a_config_error_naming_the_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"width": 64,\n "depth": }')
    with pytest.raises(ConfigError, match=rf"^{path}:2:\d+: invalid JSON"):
        read_json_config(str(path), "missing")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "mixture.yaml"
    path.write_text("sources:\n  - path: a.jsonl\n    weight: [1\n  - path: b.jsonl\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: invalid YAML"):
        read_yaml(path)
    path.write_text("")
    assert read_yaml(path) is None


def test_dtype_names_resolve_in_one_table():
    import torch

    from viq.dtypes import parse_dtype

    assert parse_dtype(None, "cuda:1") is torch.bfloat16 and parse_dtype(None, "cpu") is torch.float32
    assert parse_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype 'half' is not one of float32, fp32"):
        parse_dtype("half", "cpu")
