"""Write the synthetic chart / document / shapes data set (LLaVA JSONL + VLMEvalKit TSVs).

    python scripts/make_synthetic_data.py --out runs/data/synthetic --n 2000 [--seed 0] [--val-fraction 0.1] [--videos 200]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import make_synthetic_dataset  # noqa: E402
from viq.errors import run_cli  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (images/, train.jsonl, val.jsonl, vlmeval/)")
    parser.add_argument("--n", type=int, required=True, help="number of samples (train + val)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos", type=int, default=0,
                        help="also write this many moving-shape videos (train/val records and vlmeval/SYNTH_VIDEO.tsv)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in the validation split")
    args = parser.parse_args(argv)
    setup_logging(stream=sys.stderr)
    summary = make_synthetic_dataset(args.out, args.n, seed=args.seed, val_fraction=args.val_fraction, n_videos=args.videos)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    # Bad --n / --val-fraction values exit 2, like the argparse errors they are (one line, no usage).
    sys.exit(run_cli(main, exit_code=2))
