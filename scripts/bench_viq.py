#!/usr/bin/env python
"""Encode throughput and code storage of a ViQ preset; prints one JSON object.

    python scripts/bench_viq.py --preset viq-tiny [--device cpu|cuda] [--dtype fp32|bf16] [--out FILE]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm.bench.encode import run_encode_benchmark  # noqa: E402
from viq.errors import run_cli  # noqa: E402
from viq.io import atomic_write  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="viq-tiny", help="ViQ preset or saved tokenizer directory")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--images", type=int, default=16, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    setup_logging(stream=sys.stderr)  # stdout is the JSON result
    result = run_encode_benchmark(args.preset, args.device, args.dtype, args.images, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
