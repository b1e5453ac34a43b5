"""The extraction pipeline (data/extract_pipeline.py): decode workers and a writer thread give the
codes `ViQModel.encode` gives; bad images are counted and named; ranks split, merge and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mllm.engine import free_port
from data.conversations import load_records
from data.extract_pipeline import extract_pipeline
from data.shards import CodeStore, done_keys
from tests.fixtures import make_colour_dataset
from viq import ViQModel
from viq.errors import ImageInputError

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def viq():
    return ViQModel.from_pretrained("viq-tiny")


def reference_codes(viq, train: Path, keys) -> dict:
    return {key: viq.encode([str(train.parent / key)])[0] for key in keys}


def test_workers_and_writer_thread_give_the_encoders_codes(viq, tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=9)
    (train.parent / "images" / "004.png").write_bytes(b"not an image")  # undecodable: skipped, counted, named
    records = load_records(train, train.parent)
    out = tmp_path / "codes"
    summary = extract_pipeline(viq, "viq-tiny", records, str(out), key_root=str(train.parent), workers=2,
                               batch_images=3, bucket=True, shard_bytes=600, log=None)
    assert (summary["images_encoded"], summary["images_skipped"], summary["images_total"]) == (8, 1, 9)
    assert summary["verified"] is True and summary["merged"] is True and summary["shards"] >= 2
    skipped = [json.loads(line) for line in Path(summary["skipped_report"]).read_text().splitlines()]
    assert skipped[0]["key"] == "images/004.png" and "cannot decode image" in skipped[0]["error"]
    store = CodeStore(out)
    expected = reference_codes(viq, train, [k for k in store.keys()])
    assert len(expected) == 8
    for key, codes in expected.items():
        assert torch.equal(store.get(key), codes), key
    again = extract_pipeline(viq, "viq-tiny", records, str(out), key_root=str(train.parent), workers=0, log=None)
    assert again["images_encoded"] == 0 and again["images_already_cached"] == 8 and again["images_skipped"] == 1
    with pytest.raises(ImageInputError, match="images/004.png: cannot decode image"):
        extract_pipeline(viq, "viq-tiny", records, str(tmp_path / "strict"), key_root=str(train.parent), workers=1,
                         on_error="fail", log=None)


def launch_extraction(train: Path, out: Path, port: int, *, wait: bool):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "scripts/extract_codes.py", "--tokenizer",
           "viq-tiny", "--data", str(train), "--out", str(out), "--workers", "1", "--batch-images", "2",
           "--shard-bytes", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill reaches the launcher's ranks


@pytest.mark.slow
def test_two_ranks_under_the_launcher_split_merge_and_resume_after_a_kill(viq, tmp_path):
    train = make_colour_dataset(tmp_path / "d", n=40)
    out = tmp_path / "codes"
    port = free_port()
    proc = launch_extraction(train, out, port, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("codes-*.idx.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = done_keys(out)
    assert 0 < len(partial) < 40, f"the kill should land mid-run; {len(partial)} of 40 images were done"
    assert not (out / "manifest.json").exists()
    finished = launch_extraction(train, out, free_port(), wait=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = finished.stdout[finished.stdout.index("images encoded at"):]  # rank 0 alone reports, for both ranks
    report = report[report.index("\n") + 1:]
    summary = json.loads(report[: report.index("\n}") + 2])
    assert summary["world_size"] == 2 and summary["merged"] is True and summary["verified"] is True
    assert summary["images_already_cached"] == len(partial)  # both ranks' finished shards were kept
    assert summary["images_encoded"] + summary["images_already_cached"] == 40
    assert len(summary["per_rank_images_per_s"]) == 2
    store = CodeStore(out)
    assert len(store) == 40 and {p.name[6:9] for p in out.glob("codes-*.bin")} == {"000", "001"}
    for key, codes in reference_codes(viq, train, store.keys()).items():
        assert torch.equal(store.get(key), codes), key
