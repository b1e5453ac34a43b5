"""scripts/extract_codes.py killed part-way keeps what it encoded; the rerun encodes only the
rest and writes the same bytes as an uninterrupted run. A corrupt image is named on the console.

Fault injection: SIGKILL to the extraction process once its progress file lists at least a
third of the images (the kill lands anywhere after that: inside a batch or between commits).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures import make_colour_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("VIQ_DEBUG", None)


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "scripts/extract_codes.py", "--tokenizer", "viq-tiny", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--batch-images", "2", "--commit-seconds", "0"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith("skipped-")}


def test_a_killed_extraction_resumes_to_the_same_bytes_and_names_a_corrupt_image(tmp_path):
    data = make_colour_dataset(tmp_path / "data", n=30)
    (tmp_path / "data" / "images" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")

    whole = tmp_path / "whole"
    proc = subprocess.run(_command(data, whole), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped images/004.png: " in proc.stderr
    assert f"1 image(s) skipped; every one with its error: {whole / 'skipped-rank000.jsonl'}" in proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["images_encoded"] == 29

    killed = tmp_path / "killed"
    victim = subprocess.Popen(_command(data, killed), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    progress = killed / "codes-000-00000.progress.json"
    deadline = time.time() + 300
    committed = 0
    while time.time() < deadline and victim.poll() is None:
        try:
            committed = len(json.loads(progress.read_text())["records"]["keys"])
        except (OSError, ValueError):
            committed = 0
        if committed >= 10:
            break
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert 10 <= committed < 29, committed  # killed part-way, with committed progress
    assert not (killed / "manifest.json").exists()

    proc = subprocess.run(_command(data, killed), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["images_already_cached"] >= committed and summary["images_encoded"] == 29 - summary["images_already_cached"]
    assert _files(killed) == _files(whole)  # shards, index, meta and manifest byte for byte
    verify = subprocess.run([sys.executable, "scripts/extract_codes.py", "--out", str(killed), "--verify"], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and json.loads(verify.stdout)["n_records"] == 29


def test_undecodable_bytes_in_a_data_file_name_the_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]})
    data.write_bytes(good.encode() + b"\n" + good.encode()[:20] + b"\xff\xfe" + good.encode()[20:] + b"\n")
    proc = subprocess.run(_command(data, tmp_path / "codes"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"extract_codes: error: {data}:2: not UTF-8 text (byte 0xff at offset {len(good) + 21}); "
                               "save the file as UTF-8"), lines[0]
