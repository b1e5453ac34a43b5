"""Entry points: bad input is one line on stderr with the command's exit status; a bug keeps its traceback.

eval.run's and eval_reconstruction.py's one-line errors are tested beside their other behaviour
(tests/eval/test_run.py, tests/eval/test_reconstruction.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("VIQ_DEBUG", None)


def run(*args, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, program: str, status: int) -> str:
    assert proc.returncode == status, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    prefix, suffix = f"{program}: error: ", " (VIQ_DEBUG=1 shows the traceback)"
    assert lines[0].startswith(prefix) and lines[0].endswith(suffix), lines[0]
    return lines[0][len(prefix):-len(suffix)]


def test_extract_codes_names_the_bad_line_and_the_missing_manifest(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}\n'
                    '{"id": "b", "conver')
    message = one_line_error(run("scripts/extract_codes.py", "--tokenizer", "viq-tiny", "--data", data,
                                 "--out", tmp_path / "codes", "--device", "cpu"), "extract_codes", 1)
    assert message.startswith(f"{data}:2: invalid JSON")
    message = one_line_error(run("scripts/extract_codes.py", "--out", tmp_path / "none", "--verify"), "extract_codes", 1)
    assert message.startswith(f"{tmp_path / 'none' / 'manifest.json'} is missing")


@pytest.mark.parametrize("script, args, status, expected", [
    ("make_synthetic_data", ["--n", "0"], 2, "--n must be positive, got 0"),
    ("bench_viq", ["--preset", "viq-huge"], 1, "'viq-huge' is neither a ViQ tokenizer directory nor a preset"),
    ("bench_data", ["--n-images", "0"], 1, "--n-images must be >= 1, got 0"),
])
def test_scripts_report_bad_arguments_in_one_line(tmp_path, script, args, status, expected):
    extra = ["--out", tmp_path / "out"] if script == "make_synthetic_data" else []
    message = one_line_error(run(f"scripts/{script}.py", *extra, *args), script, status)
    assert message.startswith(expected)


def test_a_bug_in_an_entry_point_keeps_its_traceback(tmp_path):
    """An exception that is not a project error (here a RuntimeError inside the library) is a bug."""
    code = ("import runpy, sys; sys.path.insert(0, '.'); import data.shards as shards\n"
            "def broken(out): raise RuntimeError('invariant broken')\n"
            "shards.verify = broken; sys.argv = ['extract_codes.py'] + sys.argv[1:]\n"
            "runpy.run_path('scripts/extract_codes.py', run_name='__main__')")
    proc = run("--out", tmp_path, "--verify", code=code)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError: invariant broken" in proc.stderr
    assert "extract_codes: error" not in proc.stderr
