#!/usr/bin/env python
"""Train the ViQ visual tokenizer (ViQ paper stages 1 and 2) on the MLLM trainer.

    deepspeed scripts/train_viq.py --stage 1 --config configs/viq/tiny-stage1.yaml
    deepspeed scripts/train_viq.py --stage 2 --config configs/viq/tiny-stage2.yaml \\
        --set viq_train.init_from=runs/viq-tiny-stage1/export

Writes runs/<run_name>/ like train_mllm.py, and export/viq/: a tokenizer directory that
ViQModel.from_pretrained, scripts/extract_codes.py and train_mllm.py (model.viq) load.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=[1, 2], default=None, help="overrides viq_train.stage")
    ap.add_argument("--config", default=None, help="YAML (configs/viq/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--save-every", type=int, default=None)
    ap.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from mllm.config import cli_overrides, load_config
    from mllm.viq_training import ViQTrainConfig, ViQTrainer
    from viq.config import ConfigError

    stage = [f"viq_train.stage={args.stage}"] if args.stage is not None else []
    try:
        cfg = load_config(args.config, cli_overrides(args, stage), cls=ViQTrainConfig)
    except ConfigError as e:
        sys.exit(f"train_viq: error: {e}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mllm.trainer import run_training

    sys.exit(run_training(cfg, resume=args.resume, trainer_class=ViQTrainer))


if __name__ == "__main__":
    main()
