#!/usr/bin/env python
"""Encode every image of a conversation data set once into ViQ code shards.

    python scripts/extract_codes.py --tokenizer viq-tiny --data runs/data/synthetic/train.jsonl --out codes/
    python scripts/extract_codes.py --out codes/ --verify            # re-read and check everything

Resumable: rerun the same command after a kill and it continues from the last commit
(every --commit-seconds), producing the same bytes as an uninterrupted run. Several ranks: run with
--rank r --world-size n (or under torchrun / the deepspeed launcher, which set RANK and
WORLD_SIZE), then `--merge` once to list every rank's shards in one manifest.
Prints images/s, the compression ratio (raw RGB bytes / code bytes) and a JSON summary.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viq.errors import run_cli  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="ViQ preset (viq-tiny, viq-1.3b) or a saved ViQ directory")
    ap.add_argument("--data", help="conversations file: JSON / JSONL / parquet / HF datasets dir")
    ap.add_argument("--out", required=True, help="code cache directory")
    ap.add_argument("--image-root", default=None, help="root of relative image paths (default: the data file's folder)")
    ap.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    ap.add_argument("--batch-images", type=int, default=32)
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--on-error", default="skip", choices=["skip", "fail"], help="undecodable images: skip (counted, listed) or stop")
    ap.add_argument("--commit-seconds", type=float, default=30.0,
                    help="commit progress inside the open shard this often: a kill loses at most this much work")
    ap.add_argument("--verify", action="store_true", help="re-read every shard and record, report problems")
    ap.add_argument("--merge", action="store_true", help="only build the manifest from all ranks' shards")
    args = ap.parse_args()
    setup_logging(args.rank, stream=sys.stderr)  # stdout carries the results

    from data.shards import merge_manifests, verify

    if args.verify:
        report = verify(args.out)
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    if args.merge:
        manifest = merge_manifests(args.out)
        print(json.dumps({"shards": len(manifest["shards"]), "records": manifest["n_records"]}))
        return 0
    if not args.tokenizer or not args.data:
        ap.error("--tokenizer and --data are required unless --verify or --merge is given")

    from data.extract import extract_file
    from viq import ViQModel
    from viq.dtypes import default_device, parse_dtype

    device = args.device or default_device()
    model = ViQModel.from_pretrained(args.tokenizer, device=device, dtype=parse_dtype(args.dtype, device))
    summary = extract_file(
        model, args.tokenizer, args.data, args.out, image_root=args.image_root, rank=args.rank,
        world_size=args.world_size, batch_images=args.batch_images, on_error=args.on_error,
        commit_seconds=args.commit_seconds,
    )
    print(f"{summary['images_encoded']} images encoded at {summary['images_per_s']:.1f} images/s; "
          f"compression ratio {summary['compression_ratio'] or 0:.0f}x; {summary['images_skipped']} skipped")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
