#!/usr/bin/env python
"""Train a Qwen2.5 MLLM on discrete ViQ codes with DeepSpeed ZeRO and sequence packing.

    deepspeed scripts/train_mllm.py                                  # embedded default: tiny, synthetic, CPU
    deepspeed --num_gpus 8 scripts/train_mllm.py --config configs/mllm/qwen2.5-1.5b-4k.yaml
    deepspeed scripts/train_mllm.py --set optim.lr=1e-4 --max-steps 100 --resume auto

Writes runs/<run_name>/: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, hf/.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML preset (configs/mllm/*.yaml); default: the embedded tiny preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    ap.add_argument("--run-dir", default=None, help="run directory (default: runs/<trainer.run_name>)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--save-every", type=int, default=None)
    ap.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint, if any) or a checkpoint path")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = ap.parse_args()

    from mllm.config import cli_overrides, load_config
    from viq.config import ConfigError

    try:
        cfg = load_config(args.config, cli_overrides(args))
    except ConfigError as e:
        sys.exit(f"train_mllm: error: {e}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mllm.trainer import run_training

    sys.exit(run_training(cfg, resume=args.resume))


if __name__ == "__main__":
    main()
