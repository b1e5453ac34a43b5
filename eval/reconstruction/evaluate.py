"""The reconstruction evaluation: ADM centre crops -> ViQ codes -> pixels, scored by PSNR, SSIM and rFID.

    center_crop_adm(image, 256)               ADM's centre crop (guided-diffusion's center_crop_arr recipe)
    evaluate_reconstruction(tokenizer_dir, images_dir, out_dir)   what scripts/eval_reconstruction.py runs

The conventions behind each number are in eval/reconstruction/metrics.py and docs/reconstruction.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from eval.reconstruction.jpeg import JpegComparison
from eval.reconstruction.inception import FID_FEATURE_DIM, InceptionFeatures, default_fid_weights
from eval.reconstruction.metrics import PSNR_CAP_DB, ReconstructionError, frechet_distance, psnr, ssim
from viq.io import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def center_crop_adm(image: Any, size: int = 256) -> np.ndarray:
    """ADM's centre crop (guided-diffusion center_crop_arr): halve with BOX filtering while the
    shorter side is >= 2 * size, BICUBIC-resize the shorter side to size (sides rounded), then cut
    the centre size x size. Returns uint8 [size, size, 3]."""
    from viq.image import load_image

    pil = load_image(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def list_images(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise ReconstructionError(f"{root}: not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ReconstructionError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths


def _resize_uint8(image_chw: torch.Tensor, size: int) -> np.ndarray:
    pil = Image.fromarray(image_chw.permute(1, 2, 0).numpy())
    return np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def save_comparison_grid(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], path) -> None:
    """PNG with the originals on the top row and their reconstructions below (uint8 [H, W, 3] each)."""
    top = np.concatenate(list(originals), axis=1)
    bottom = np.concatenate(list(reconstructions), axis=1)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(path)


def evaluate_reconstruction(
    tokenizer: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch: int = 16,
    fid_weights: str | os.PathLike | None = None,
    compute_fid: bool = True,
    image_size: int = 256,
    tokens_per_side: int | None = 16,
    grid_pairs: int = 8,
    device: str | None = None,
    compare_jpeg: bool = True,
) -> dict:
    """Centre-crop every image to image_size (ADM), encode to ViQ codes, decode, and score the
    reconstructions against the same crops: mean PSNR, mean SSIM and rFID.

    The crop is fed to the tokenizer at tokens_per_side * 28 px (16 -> 448 px, 16 x 16 tokens; None
    lets the tokenizer's resize policy choose) and the reconstruction is resized (bicubic) back to
    image_size before scoring. Writes metrics.json and grid.png under out_dir when given.
    compare_jpeg adds the codes' bits per pixel and JPEG at the same bitrate (eval/reconstruction/jpeg.py)
    as result["vs_jpeg"], and rate_distortion.png under out_dir.
    """
    from viq.decoder import ViQDecoder
    from viq.model import ViQModel

    if batch < 1:
        raise ReconstructionError(f"batch must be >= 1, got {batch}")
    paths = list_images(images_dir)[: limit if limit else None]
    decoder = ViQDecoder.from_pretrained(tokenizer, device=device)
    viq = ViQModel.from_pretrained(tokenizer, device=device)
    extractor = InceptionFeatures.from_weights(fid_weights or default_fid_weights(), device) if compute_fid else None
    jpeg = JpegComparison(viq.codebook_size) if compare_jpeg else None
    feats_jpeg = []

    psnrs, ssims, feats_in, feats_out, shown_in, shown_out, grids = [], [], [], [], [], [], []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        crops = [center_crop_adm(p, image_size) for p in chunk]
        inputs = [Image.fromarray(c) for c in crops]
        if tokens_per_side:
            side = tokens_per_side * 28
            inputs = [im.resize((side, side), Image.BICUBIC) for im in inputs]
        codes = viq.encode(inputs, names=[str(p) for p in chunk])
        grids += [tuple(c.shape[:2]) for c in codes]
        recons = [_resize_uint8(r, image_size) for r in decoder.decode_codes(viq, codes)]
        psnrs += [psnr(a, b) for a, b in zip(crops, recons)]
        ssims += [ssim(a, b) for a, b in zip(crops, recons)]
        if jpeg is not None:
            jpeg.add(crops, codes, keep_images=extractor is not None)
        if extractor is not None:
            feats_in.append(extractor.features(crops, batch))
            feats_out.append(extractor.features(recons, batch))
            if jpeg is not None:
                feats_jpeg.append(extractor.features(jpeg.take_matched_images(), batch))
        room = grid_pairs - len(shown_in)
        shown_in += crops[:room]
        shown_out += recons[:room]

    n = len(paths)
    result: dict[str, Any] = {
        "images": n,
        "image_size": image_size,
        "token_grid": list(grids[0]) if len(set(grids)) == 1 else "mixed",
        "psnr": float(np.mean(psnrs)),
        "ssim": float(np.mean(ssims)),
        "rfid": None,
        "psnr_cap_db": PSNR_CAP_DB,
        "tokenizer": str(tokenizer),
        "images_dir": str(images_dir),
    }
    if extractor is not None:
        if n >= 2:
            result["rfid"] = frechet_distance(np.concatenate(feats_in), np.concatenate(feats_out))
        if n < FID_FEATURE_DIM:
            result["rfid_note"] = (
                f"FID over {n} < {FID_FEATURE_DIM} images is strongly biased (rank-deficient covariance); "
                "compare only runs on the same image set"
            )
    else:
        result["rfid_note"] = "not computed (--no-fid)"
    if jpeg is not None:
        result["vs_jpeg"] = jpeg.result(result["psnr"], result["ssim"], np.concatenate(feats_in) if feats_jpeg else None,
                                        np.concatenate(feats_jpeg) if feats_jpeg else None)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if jpeg is not None:
            JpegComparison.plot(result["vs_jpeg"], out / "rate_distortion.png", f"codes vs JPEG, {n} images")
            result["rate_distortion_png"] = str(out / "rate_distortion.png")
        atomic_write(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        save_comparison_grid(shown_in, shown_out, out / "grid.png")
        result["grid_png"] = str(out / "grid.png")
    return result
