#!/usr/bin/env python
"""Plan a training run before starting it: per-GPU memory by term, whether it fits, steps per
epoch, tokens and wall-clock.

    python scripts/plan_run.py --config configs/mllm/qwen2.5-7b-16k.yaml --gpus 8 --gpu h100-80g
    python scripts/plan_run.py --config configs/mllm/qwen2.5-72b-16k.yaml --gpus 64 --gpu h100-80g --nodes 8
    python scripts/plan_run.py --config ... --set trainer.deepspeed_config=configs/deepspeed/zero3_offload.json

Lengths come from the config's data set when its conversations and code cache are on this
machine, else from --lengths (a .npy or text file, one length per line), else from the
LLaVA-OneVision-like mix of the data benchmark (--samples of it). Exits 1 with the largest
memory term named when the plan does not fit.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML preset (configs/mllm/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in total (all nodes)")
    ap.add_argument("--gpu", default="h100-80g", help="GPU kind (h100-80g, h200-141g, a100-80g, ...)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (host memory per node)")
    ap.add_argument("--lengths", type=Path, default=None, help="sample lengths (.npy or one per line)")
    ap.add_argument("--samples", type=int, default=2_000_000, help="size of the assumed length mix")
    args = ap.parse_args()
    from mllm.plan_cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
