"""Reconstruction metrics for ViQ codes -> pixels: PSNR, SSIM and the Frechet distance of rFID.

    psnr(a, b), ssim(a, b)                    one pair of uint8 images (tensor [3, H, W] or array [H, W, 3])
    mean_psnr(as_, bs), mean_ssim(as_, bs)    averaged over a set
    frechet_distance(features_a, features_b)  FID of two feature sets (eval.reconstruction.inception's)

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

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from viq.errors import DataError

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scikit-image's truncate=3.5 -> an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03


class ReconstructionError(DataError):
    """Bad input to the reconstruction evaluation (images, weights); the message names it."""


def to_unit_float64(image: Any, label: str = "image") -> torch.Tensor:
    """uint8 tensor [3, H, W] (channel-first) or uint8 array [H, W, 3] -> float64 [3, H, W] in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ReconstructionError(f"{label}: expected a uint8 array [H, W, 3], got {image.dtype} {image.shape}")
        t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ReconstructionError(f"{label}: expected a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}")
        t = image.detach().cpu()
    else:
        raise ReconstructionError(f"{label}: expected a uint8 tensor or array, got {type(image).__name__}")
    return t.to(torch.float64) / 255.0


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
