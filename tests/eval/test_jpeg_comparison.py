"""Codes vs JPEG (eval/reconstruction/jpeg.py): bit counts, entropy, the matched quality."""
import math

import numpy as np
import torch

from eval.reconstruction.jpeg import (MAX_QUALITY, MIN_QUALITY, JpegComparison, code_bits, entropy_bits_per_code,
                                      jpeg_round_trip, match_quality)


def smooth_image(seed=0, size=96):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 100 + 128
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def test_code_bits_and_entropy_known_values():
    assert code_bits(torch.zeros(16, 16, 4, dtype=torch.long), 1000) == 1024 * math.log2(1000)
    assert entropy_bits_per_code(torch.tensor([5, 5, 5, 5, 5, 5, 5, 5, 0, 0])) == 3.0
    assert entropy_bits_per_code(torch.tensor([7, 0, 0])) == 0.0


def test_matched_quality_is_the_closest_file_size_over_every_quality():
    image = smooth_image()
    sizes = {q: jpeg_round_trip(image, q)[0] * 8 for q in range(MIN_QUALITY, MAX_QUALITY + 1)}
    for target in (sizes[7] + 3, (sizes[30] + sizes[31]) / 2, sizes[80], 1.0, 1e9):
        quality, size, decoded = match_quality(image, target)
        best = min(abs(s - target) for s in sizes.values())
        assert abs(sizes[quality] - target) == best and size * 8 == sizes[quality]
        assert decoded.shape == image.shape


def test_comparison_curve_and_matched_rate():
    image = smooth_image(1)
    comp = JpegComparison(codebook_size=1000, qualities=(5, 50, 95))
    codes = torch.randint(0, 1000, (6, 6, 4), generator=torch.Generator().manual_seed(0))
    comp.add([image], [codes])
    result = comp.result(codes_psnr=20.0, codes_ssim=0.5)
    pixels = 96 * 96
    assert result["codes"]["bpp_fixed_length"] == 144 * math.log2(1000) / pixels
    curve = result["jpeg_curve"]
    assert [p["quality"] for p in curve] == [5, 50, 95]
    assert curve[0]["bpp"] < curve[1]["bpp"] < curve[2]["bpp"] and curve[0]["psnr"] < curve[2]["psnr"]
    quality = result["jpeg_matched"]["qualities"][0]
    assert result["jpeg_matched"]["bpp"] == jpeg_round_trip(image, quality)[0] * 8 / pixels
