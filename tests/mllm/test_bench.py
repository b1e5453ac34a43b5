import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_throughput_reports_every_arm():
    proc = subprocess.run(
        [sys.executable, "scripts/bench_throughput.py", "--capacity", "512", "--image-size", "112", "--steps", "1",
         "--warmup", "0"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["arms"]) == {"codes", "online_viq", "continuous_frozen", "continuous_trainable"}
    assert result["images_per_pack"] >= 1 and result["image_tokens"] == 16 * result["images_per_pack"]
    for arm, entry in result["arms"].items():
        assert entry["step_ms"] > 0 and entry["tokens_per_s"] > 0
        assert ("codes_speedup" in entry) == (arm != "codes")


def test_bench_throughput_rejects_unknown_arm():
    proc = subprocess.run([sys.executable, "scripts/bench_throughput.py", "--arms", "codes,pixels"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown arm(s) ['pixels']; valid: codes, online_viq" in proc.stderr
