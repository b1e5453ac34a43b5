#!/usr/bin/env python
"""Tokenizer ablation in the shape of the ViQ paper's Table 4, from one stage-1 export.

    python scripts/run_ablation.py --config configs/ablation/tiny.yaml                 # CPU, the synthetic set
    python scripts/run_ablation.py --config configs/ablation/tiny.yaml --publish docs/bench/ablation-tiny
    python scripts/run_ablation.py --config configs/ablation/viq-1.3b.yaml --set ranks=8   # GPUs, real data

Each variant (viq_train.quant switches, vae_weight) trains its stage 2 on the same data and
steps, its codes are extracted, an MLLM trains on them, and it is evaluated; a blind baseline
(vision.source none) gives the text-prior floor. Writes <out>/table.{md,json,png}; rerunning
resumes (finished rows are kept, interrupted launches resume from their checkpoints).
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viq.errors import run_cli  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/ablation/<name>.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the ablation config, e.g. --set mllm.steps=50 (repeatable)")
    ap.add_argument("--publish", default=None, help="also copy table.md / table.json / table.png into this folder")
    ap.add_argument("--report-only", action="store_true", help="launch nothing: the table of the rows finished so far")
    args = ap.parse_args()
    setup_logging()

    from eval.ablation import AblationRun, load_ablation_config, write_table

    cfg = load_ablation_config(args.config, args.overrides)
    run = AblationRun(cfg)
    rows = run.finished_rows() if args.report_only else run.run()
    paths = write_table(cfg, rows, cfg.out_dir)
    if args.publish:
        Path(args.publish).mkdir(parents=True, exist_ok=True)
        for path in paths.values():
            shutil.copy2(path, Path(args.publish) / path.name)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
