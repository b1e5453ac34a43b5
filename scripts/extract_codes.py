#!/usr/bin/env python
"""Encode every image of a conversation data set once into ViQ code shards.

    python scripts/extract_codes.py --tokenizer viq-tiny --data runs/data/synthetic/train.jsonl --out codes/
    python scripts/extract_codes.py --out codes/ --verify            # re-read and check everything

    deepspeed --num_gpus 8 scripts/extract_codes.py --tokenizer viq-1.3b --data train.jsonl --out codes/ --workers 8

Images are decoded by --workers processes while the encoder runs and shards are written by a
thread (data/extract_pipeline.py). Resumable: rerun the same command after a kill and it
continues from the last commit (every --commit-seconds), producing the same bytes as an
uninterrupted run. Several ranks: under torchrun or the deepspeed launcher each rank takes its
share, and rank 0 merges every rank's shards into one manifest and verifies them when all are
done; by hand, --rank r --world-size n per process, then `--merge` once.
Prints images/s, the compression ratio (raw RGB bytes / code bytes) and a JSON summary.
Video records are sampled with --video-max-frames / --video-fps / --video-frame-max-pixels
(the trainer's data.video.*; each setting keeps its own frames in the cache).
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
    ap.add_argument("--rank", type=int, default=None, help="by hand, with --world-size (default: the launcher's)")
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    ap.add_argument("--batch-images", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decode processes (0: in the main process)")
    ap.add_argument("--bucket", action="store_true", help="batch same-size images together (no attention mask)")
    ap.add_argument("--shard-bytes", type=int, default=256 << 20, help="bytes per shard (smaller: finer-grained resume)")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--on-error", default="skip", choices=["skip", "fail"], help="undecodable images: skip (counted, listed) or stop")
    ap.add_argument("--video-max-frames", type=int, default=32, help="frames per video (data.video.max_frames)")
    ap.add_argument("--video-fps", type=float, default=0.0, help="frames per second, 0: uniform (data.video.fps)")
    ap.add_argument("--video-frame-max-pixels", type=int, default=224 * 224, help="per-frame pixel budget (data.video.frame_max_pixels)")
    ap.add_argument("--commit-seconds", type=float, default=30.0,
                    help="commit progress inside the open shard this often: a kill loses at most this much work")
    ap.add_argument("--verify", action="store_true", help="re-read every shard and record, report problems")
    ap.add_argument("--merge", action="store_true", help="only build the manifest from all ranks' shards")
    args = ap.parse_args()
    setup_logging(int(os.environ.get("RANK", args.rank or 0)), stream=sys.stderr)  # stdout carries the results

    from data.shards import merge_manifests, verify
    from data.video_codes import incomplete_video_errors

    if args.verify:
        report = verify(args.out)
        report["errors"] += incomplete_video_errors(args.out)
        report["ok"] = not report["errors"]
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    if args.merge:
        manifest = merge_manifests(args.out)
        print(json.dumps({"shards": len(manifest["shards"]), "records": manifest["n_records"]}))
        return 0
    if not args.tokenizer or not args.data:
        ap.error("--tokenizer and --data are required unless --verify or --merge is given")

    from data.conversations import load_records
    from data.extract_pipeline import extract_pipeline
    from data.video import VideoSettings
    from viq import ViQModel
    from viq.dtypes import default_device, parse_dtype

    if (args.rank is None) != (args.world_size is None):
        ap.error("--rank and --world-size go together")
    video = VideoSettings(args.video_max_frames, args.video_fps, args.video_frame_max_pixels).validate("--video")
    device = args.device or default_device()
    if device == "cuda":  # one GPU per rank under a launcher
        device = f"cuda:{os.environ.get('LOCAL_RANK', args.local_rank or 0)}"
    model = ViQModel.from_pretrained(args.tokenizer, device=device, dtype=parse_dtype(args.dtype, device))
    image_root = args.image_root or str(Path(args.data).parent)
    summary = extract_pipeline(
        model, args.tokenizer, load_records(args.data, image_root), args.out, key_root=image_root,
        workers=args.workers, batch_images=args.batch_images, bucket=args.bucket, on_error=args.on_error,
        shard_bytes=args.shard_bytes, rank=args.rank, world_size=args.world_size, video=video,
        commit_seconds=args.commit_seconds, log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    if summary["rank"] != 0 and summary.get("merged"):
        return 0  # rank 0 reports the whole run
    print(f"{summary['images_encoded']} images encoded at {summary['images_per_s']:.1f} images/s; "
          f"compression ratio {summary['compression_ratio'] or 0:.0f}x; {summary['images_skipped']} skipped; "
          f"{summary['videos_encoded']} videos ({summary['video_frames_encoded']} frames), {summary['videos_skipped']} skipped")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
