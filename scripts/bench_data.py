#!/usr/bin/env python
"""Data-path benchmark: packing efficiency, packed-loader throughput from cached codes, shard I/O.

    python scripts/bench_data.py [--out bench_data.json] [--n-samples 50000] [--n-images 3000]

Prints one JSON object (also written to --out). The length mix and the targets are described
in mllm/bench/data_path.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viq.errors import ConfigError, run_cli  # noqa: E402
from viq.io import atomic_write  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here as well")
    parser.add_argument("--n-samples", type=int, default=50_000, help="samples in the packing length mix")
    parser.add_argument("--n-images", type=int, default=3000, help="images in the temporary code cache")
    parser.add_argument("--buffer-size", type=int, default=2048, help="loader buffer (samples per rank)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging(stream=sys.stderr)  # stdout is the JSON report
    for flag, value in (("--n-samples", args.n_samples), ("--n-images", args.n_images), ("--buffer-size", args.buffer_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    from mllm.bench.data_path import run_data_benchmark

    report = run_data_benchmark(args.n_samples, args.n_images, args.buffer_size, args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
