"""Reconstruction metrics for ViQ codes -> pixels: PSNR, SSIM and rFID, plus the evaluation run.

    psnr(a, b), ssim(a, b)                    one pair of uint8 images (tensor [3, H, W] or array [H, W, 3])
    mean_psnr(as_, bs), mean_ssim(as_, bs)    averaged over a set
    extractor = InceptionFeatures.from_weights(default_fid_weights())
    frechet_distance(extractor(originals), extractor(reconstructions))
    center_crop_adm(image, 256)               ADM's centre crop (guided-diffusion's center_crop_arr recipe)
    evaluate_reconstruction(tokenizer_dir, images_dir, out_dir)   what scripts/eval_reconstruction.py runs

Conventions (each avoids a bug that inflated published numbers, see docs/reconstruction.md):
- Pixels are uint8 scaled to [0, 1]; PSNR and SSIM use data_range 1 (SSIM with data_range 2 on
  [0, 1] images inflates it, LlamaGen #72).
- PSNR of identical images is capped at PSNR_CAP_DB = 100 dB (a finite, JSON-safe value; any real
  reconstruction is far below it), so set means stay finite.
- SSIM: Gaussian window (sigma 1.5, 11 taps), K1 0.01, K2 0.03, population covariance, float64, mean
  over the valid (un-padded) region of each channel, channels averaged: what scikit-image's
  structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
  computes.
- rFID compares the reconstructions with the same centre-cropped inputs, never with training-set
  statistics (LlamaGen #34). Features are the 2048-d pool features of the TF-Inception-v3 FID network
  as torch-fidelity's `inception-v3-compat` extractor computes them: TF1-style bilinear resize to
  299 (align_corners=False, no antialiasing), (x - 128) / 128, TF-compatible pooling.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.reconstruction.inception import (
    FID_FEATURE_DIM,
    InceptionFeatures,
    ReconstructionError,
    default_fid_weights,
    to_unit_float64,
)

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scikit-image's truncate=3.5 -> an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ---- PSNR / SSIM ------------------------------------------------------------------------------
def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_unit_float64(a, "first image"), to_unit_float64(b, "second image")
    if x.shape != y.shape:
        raise ReconstructionError(f"image sizes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of two uint8 images on [0, 1] (data_range 1); identical images give PSNR_CAP_DB."""
    x, y = _pair(a, b)
    mse = float(torch.mean((x - y) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def _gaussian_taps() -> torch.Tensor:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _blur_valid(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over [C, H, W] keeping only fully covered pixels (-> [C, H-10, W-10])."""
    taps = _gaussian_taps()
    c = x.shape[0]
    x = F.conv2d(x[None], taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM (data_range 1) of two uint8 images, channels averaged; see the module docstring."""
    x, y = _pair(a, b)
    side = 2 * SSIM_RADIUS + 1
    if min(x.shape[1:]) < side:
        raise ReconstructionError(f"SSIM needs images of at least {side}x{side} pixels, got {x.shape[2]}x{x.shape[1]}")
    # The window is only evaluated where it lies inside the image: scikit-image crops that border
    # from its (reflect-padded) map before averaging, so padding never enters the mean.
    mu_x, mu_y = _blur_valid(x), _blur_valid(y)
    var_x = _blur_valid(x * x) - mu_x * mu_x
    var_y = _blur_valid(y * y) - mu_y * mu_y
    cov = _blur_valid(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dim=(1, 2)).mean())


def _mean_over(metric, as_: Sequence[Any], bs: Sequence[Any]) -> float:
    if len(as_) != len(bs) or not as_:
        raise ReconstructionError(f"need two equally long, non-empty image lists, got {len(as_)} and {len(bs)}")
    return float(np.mean([metric(a, b) for a, b in zip(as_, bs)]))


def mean_psnr(as_: Sequence[Any], bs: Sequence[Any]) -> float:
    return _mean_over(psnr, as_, bs)


def mean_ssim(as_: Sequence[Any], bs: Sequence[Any]) -> float:
    return _mean_over(ssim, as_, bs)


# ---- FID --------------------------------------------------------------------------------------
def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)) in float64, S unbiased covariances.

    With centred features X_a = Q_a R_a and X_b = Q_b R_b (thin QR), S_a S_b has the same non-zero
    eigenvalues as K K^T for K = R_a R_b^T / sqrt((n_a - 1)(n_b - 1)), so tr((S_a S_b)^(1/2)) is the
    sum of K's singular values. Exact for the rank-deficient covariances of small sets (where the
    scipy.linalg.sqrtm formula returns complex parts and negative FIDs) and cheaper than sqrtm.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ReconstructionError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ReconstructionError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    norm = math.sqrt((len(a) - 1) * (len(b) - 1))
    r_a, r_b = np.linalg.qr(xa, mode="r"), np.linalg.qr(xb, mode="r")
    tr_sqrt = float(np.linalg.svd(r_a @ r_b.T, compute_uv=False).sum()) / norm
    tr_a, tr_b = float((xa * xa).sum()) / (len(a) - 1), float((xb * xb).sum()) / (len(b) - 1)
    fid = float(((mu_a - mu_b) ** 2).sum()) + tr_a + tr_b - 2.0 * tr_sqrt
    return max(fid, 0.0)


# ---- the evaluation protocol --------------------------------------------------------------------
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
) -> dict:
    """Centre-crop every image to image_size (ADM), encode to ViQ codes, decode, and score the
    reconstructions against the same crops: mean PSNR, mean SSIM and rFID.

    The crop is fed to the tokenizer at tokens_per_side * 28 px (16 -> 448 px, 16 x 16 tokens; None
    lets the tokenizer's resize policy choose) and the reconstruction is resized (bicubic) back to
    image_size before scoring. Writes metrics.json and grid.png under out_dir when given.
    """
    from viq.decoder import ViQDecoder
    from viq.model import ViQModel

    if batch < 1:
        raise ReconstructionError(f"batch must be >= 1, got {batch}")
    paths = list_images(images_dir)[: limit if limit else None]
    decoder = ViQDecoder.from_pretrained(tokenizer, device=device)
    viq = ViQModel.from_pretrained(tokenizer, device=device)
    extractor = InceptionFeatures.from_weights(fid_weights or default_fid_weights(), device) if compute_fid else None

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
        if extractor is not None:
            feats_in.append(extractor.features(crops, batch))
            feats_out.append(extractor.features(recons, batch))
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
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        save_comparison_grid(shown_in, shown_out, out / "grid.png")
        result["grid_png"] = str(out / "grid.png")
    return result
