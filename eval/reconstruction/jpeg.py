"""Codes vs JPEG at the same bitrate: how many bits the codes take, and what JPEG does with as many.

    code_bits(codes, codebook_size)     fixed-length bits of one image's codes: 4 sub-codes x log2(K) per token
    entropy_bits_per_code(counts)       empirical entropy of the code stream (bits per sub-code)
    jpeg_round_trip(image, quality)     (file bytes, decoded uint8) with PIL's encoder
    match_quality(image, target_bits)   the JPEG quality whose file size is closest to target_bits
    JpegComparison                      accumulates the above over an evaluation, then .result() and .plot()

The ViQ paper states that codes take 1/96 of the raw image and reconstruct better than JPEG at
the same bitrate. Bits are counted against the pixels that are scored (the centre crop, e.g.
256 x 256), whatever size the tokenizer was fed. JPEG sizes are whole files (headers and
Huffman tables included, `optimize=True`, PIL's default 4:2:0 chroma subsampling); the codes'
count has no header (the grid size is a few bytes more). When even quality 1 is larger than the
codes, the closest JPEG is larger than the codes and the result says so (`jpeg_bpp` is always
the matched file's real rate).
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from eval.reconstruction.metrics import frechet_distance, psnr, ssim

CURVE_QUALITIES = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 75, 90, 95)
MIN_QUALITY, MAX_QUALITY = 1, 95  # PIL's useful range (above 95 mostly grows the file)


def code_bits(codes: torch.Tensor, codebook_size: int) -> float:
    """Fixed-length bits of codes [h, w, 4]: every sub-code costs log2(codebook_size)."""
    return codes.numel() * math.log2(codebook_size)


def entropy_bits_per_code(counts: torch.Tensor) -> float:
    """Empirical (zeroth-order) entropy in bits of a code stream with these per-code counts."""
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0


def jpeg_round_trip(image: np.ndarray, quality: int) -> tuple[int, np.ndarray]:
    """(file size in bytes, decoded uint8 [H, W, 3]) of `image` saved as JPEG at `quality`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality), optimize=True)
    size = buffer.tell()
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return size, np.asarray(decoded.convert("RGB"), dtype=np.uint8)


def match_quality(image: np.ndarray, target_bits: float) -> tuple[int, int, np.ndarray]:
    """(quality, bytes, decoded) of the JPEG whose size is closest to target_bits; file size grows
    with quality, so a bisection finds the two qualities around the target."""
    cache: dict[int, tuple[int, np.ndarray]] = {}

    def at(q: int) -> tuple[int, np.ndarray]:
        if q not in cache:
            cache[q] = jpeg_round_trip(image, q)
        return cache[q]

    lo, hi = MIN_QUALITY, MAX_QUALITY
    while lo < hi:  # the smallest quality whose file reaches the target
        mid = (lo + hi) // 2
        if at(mid)[0] * 8 >= target_bits:
            hi = mid
        else:
            lo = mid + 1
    candidates = [q for q in (lo - 1, lo) if MIN_QUALITY <= q <= MAX_QUALITY]
    best = min(candidates, key=lambda q: (abs(at(q)[0] * 8 - target_bits), q))
    return best, at(best)[0], at(best)[1]


class JpegComparison:
    """Per image: the codes' bits, the matched JPEG's quality / bits / PSNR / SSIM; over the set:
    the JPEG rate-distortion curve at CURVE_QUALITIES and the codes' empirical entropy."""

    def __init__(self, codebook_size: int, qualities: Sequence[int] = CURVE_QUALITIES):
        self.codebook_size = codebook_size
        self.qualities = tuple(qualities)
        self.counts = torch.zeros(codebook_size, dtype=torch.long)
        self.code_bits: list[float] = []
        self.pixels: list[int] = []
        self.matched: list[dict] = []
        self.matched_images: list[np.ndarray] = []
        self.curve = {q: {"bits": [], "psnr": [], "ssim": []} for q in self.qualities}

    def add(self, crops: Sequence[np.ndarray], codes: Sequence[torch.Tensor], keep_images: bool = True) -> None:
        for crop, c in zip(crops, codes):
            self.counts += torch.bincount(c.reshape(-1).long(), minlength=self.codebook_size)
            bits = code_bits(c, self.codebook_size)
            self.code_bits.append(bits)
            self.pixels.append(crop.shape[0] * crop.shape[1])
            quality, size, decoded = match_quality(crop, bits)
            self.matched.append({"quality": quality, "bits": size * 8, "psnr": psnr(crop, decoded),
                                 "ssim": ssim(crop, decoded)})
            if keep_images:
                self.matched_images.append(decoded)
            for q in self.qualities:
                size, decoded = jpeg_round_trip(crop, q)
                point = self.curve[q]
                point["bits"].append(size * 8)
                point["psnr"].append(psnr(crop, decoded))
                point["ssim"].append(ssim(crop, decoded))

    def take_matched_images(self) -> list[np.ndarray]:
        """The matched JPEG decodes added since the last call (for rFID features), then forgotten."""
        images, self.matched_images = self.matched_images, []
        return images

    def result(self, codes_psnr: float, codes_ssim: float, feats_in=None, feats_jpeg=None) -> dict:
        pixels = float(sum(self.pixels))
        n_codes = int(self.counts.sum())
        entropy = entropy_bits_per_code(self.counts)
        code_bpp = sum(self.code_bits) / pixels
        jpeg_bpp = sum(m["bits"] for m in self.matched) / pixels
        matched_rfid = None
        if feats_in is not None and feats_jpeg is not None and len(feats_in) >= 2:
            matched_rfid = frechet_distance(feats_in, feats_jpeg)
        return {
            "raw_bpp": 24.0,
            "codes": {
                "bpp_fixed_length": code_bpp,
                "bpp_entropy": entropy * n_codes / pixels,
                "entropy_bits_per_code": entropy,
                "bits_per_code_fixed": math.log2(self.codebook_size),
                "fraction_of_raw": code_bpp / 24.0,
                "psnr": codes_psnr,
                "ssim": codes_ssim,
            },
            "jpeg_matched": {
                "bpp": jpeg_bpp,
                "mean_quality": float(np.mean([m["quality"] for m in self.matched])),
                "qualities": [m["quality"] for m in self.matched],
                "psnr": float(np.mean([m["psnr"] for m in self.matched])),
                "ssim": float(np.mean([m["ssim"] for m in self.matched])),
                "rfid": matched_rfid,
                "larger_than_codes": sum(m["bits"] > b for m, b in zip(self.matched, self.code_bits)),
            },
            "jpeg_curve": [
                {"quality": q, "bpp": sum(p["bits"]) / pixels, "psnr": float(np.mean(p["psnr"])),
                 "ssim": float(np.mean(p["ssim"]))}
                for q, p in self.curve.items()
            ],
        }

    @staticmethod
    def plot(result: dict, path, title: str = "codes vs JPEG") -> None:
        """Rate-distortion PNG: PSNR and SSIM against bits per pixel, the JPEG curve and the codes' points."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        curve, codes, matched = result["jpeg_curve"], result["codes"], result["jpeg_matched"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
            ax.plot([p["bpp"] for p in curve], [p[key] for p in curve], "o-", color="tab:blue", label="JPEG (quality 1-95)")
            ax.plot([codes["bpp_fixed_length"]], [codes[key]], "*", ms=14, color="tab:red", label="ViQ codes (fixed length)")
            ax.plot([codes["bpp_entropy"]], [codes[key]], "*", ms=14, color="tab:orange", mfc="none",
                    label="ViQ codes (entropy)")
            ax.plot([matched["bpp"]], [matched[key]], "s", color="tab:blue", mfc="none", ms=9, label="JPEG matched per image")
            ax.set_xscale("log")
            ax.set_xlabel("bits per pixel (log)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
