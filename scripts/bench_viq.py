#!/usr/bin/env python
"""Encode throughput and code storage of a ViQ preset; prints one JSON object.

    python scripts/bench_viq.py --preset viq-tiny [--device cpu|cuda] [--dtype fp32|bf16] [--out FILE]
    python scripts/bench_viq.py --preset viq-1.3b --levers all --images 64 --out runs/encode_levers.json

--levers: each encode lever one at a time against the baseline, on 448 px, mixed native sizes
(112-896 px sides) and 256 px images as 16 x 16 tokens: size-bucketed batches, the mask-free
attention of equal segments, tokens per batch, and on CUDA masked SDPA vs FlexAttention and
compiled blocks; with the quantiser's share of the time and how many codes a lever changes.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm.bench.report import print_and_save  # noqa: E402
from mllm.bench.encode import ENCODE_CASES, run_encode_benchmark, run_encode_levers  # noqa: E402
from viq.errors import ConfigError  # noqa: E402
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
    ap.add_argument("--levers", default="", help="comma-separated encode levers, or 'all' (mllm/bench/encode.py)")
    ap.add_argument("--cases", default="", help="with --levers: comma-separated cases (default: all)")
    ap.add_argument("--out", default=None, help="also write the JSON here (with --levers: after every measurement)")
    args = ap.parse_args()
    setup_logging(stream=sys.stderr)  # stdout is the JSON result
    if args.levers:
        levers = None if args.levers == "all" else args.levers.split(",")
        cases = [c for c in args.cases.split(",") if c] or None
        unknown = [c for c in cases or [] if c not in ENCODE_CASES]
        if unknown:
            raise ConfigError(f"--cases: unknown {unknown}; valid: {', '.join(ENCODE_CASES)}")
        save = (lambda r: atomic_write(args.out, json.dumps(r, indent=2) + "\n")) if args.out else None
        try:
            result = run_encode_levers(args.preset, args.device, args.dtype, args.images, args.repeats, levers, cases,
                                       on_result=save)
        except ValueError as e:
            raise ConfigError(f"--levers: {e}") from None
    else:
        result = run_encode_benchmark(args.preset, args.device, args.dtype, args.images, args.repeats)
    print_and_save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
