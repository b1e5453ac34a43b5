#!/usr/bin/env python
"""Extraction throughput: JPEG decode images/s per worker, encode only, JPEG files to verified shards.

    python scripts/bench_extract.py --preset viq-tiny --images 64 --workers 0,1,2 --out docs/bench/extract_cpu.json
    python scripts/bench_extract.py --preset viq-1.3b --images 512 --workers 0,4,16   # on a GPU

Prints one JSON object (mllm/bench/extract.py); on a GPU the target is end_to_end /
encode_only >= 0.9.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viq.errors import ConfigError, run_cli  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="viq-tiny", help="ViQ preset or saved tokenizer directory")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated decode worker counts to time")
    ap.add_argument("--extract-workers", type=int, default=None, help="workers of the end-to-end run (default: the most)")
    ap.add_argument("--size", default="480,640", help="JPEG height,width")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    setup_logging(stream=sys.stderr)
    try:
        workers = [int(w) for w in args.workers.split(",")]
        size = tuple(int(v) for v in args.size.split(","))
    except ValueError:
        raise ConfigError(f"--workers / --size must be comma-separated integers, got {args.workers!r} / {args.size!r}") from None
    if args.images < 8 or min(workers) < 0 or len(size) != 2:
        raise ConfigError("--images must be >= 8, --workers >= 0 and --size height,width")
    from mllm.bench.extract import run_extract_benchmark
    from mllm.bench.report import print_and_save

    result = run_extract_benchmark(args.preset, args.images, workers, args.device, args.dtype, size, args.extract_workers)
    print_and_save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
