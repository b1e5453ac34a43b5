"""Image input for the ViQ tokenizer: loading, RGB conversion, the resize policy, patches.

Any input (path, bytes, PIL image, numpy array, tensor) becomes an RGB PIL image:
EXIF orientation applied; grayscale, palette and CMYK converted; alpha composited over
white; 16-bit and 32-bit integer images scaled to 8 bits (value / 257, rounded). Then the
image is resized so both sides are multiples of patch * merge (28 px by default) with its
pixel count inside [min_pixels, max_pixels] and its aspect ratio kept as far as the grid
allows (the Qwen2-VL "smart resize" rule). An image over max_pixels is scaled down when
`oversize == "resize"` (the default) and refused when `oversize == "error"`.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from viq.errors import ImageInputError  # noqa: F401 - re-exported: the name callers import from here

# Decompression bombs are caught by our own max_pixels policy with a clear message.
Image.MAX_IMAGE_PIXELS = None

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200




@dataclass(frozen=True)
class ResizePolicy:
    """How an image becomes the ViT's input: the resize rule and the pixel normalisation."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 448 * 448
    oversize: str = "resize"  # "resize" | "error"
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def describe(x: Any, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if isinstance(x, Image.Image):
        return f"PIL image {x.size[0]}x{x.size[1]} mode {x.mode}"
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)}"
    if isinstance(x, (bytes, bytearray)):
        return f"{len(x)} bytes of image data"
    return type(x).__name__


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype in (np.uint16, np.int32, np.uint32, np.int64) or np.issubdtype(arr.dtype, np.integer):
        return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    # floats are taken as [0, 1]
    return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Deterministic conversion of any PIL mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(img))).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(x: Any, name: str | None = None) -> Image.Image:
    """Path / bytes / PIL / numpy [H,W(,C)] / tensor [C,H,W] -> RGB PIL image, or ImageInputError."""
    label = describe(x, name)
    try:
        if isinstance(x, (str, os.PathLike)):
            if not os.path.exists(x):
                raise ImageInputError(f"{label}: image file not found")
            with Image.open(x) as im:
                im.load()
                img = ImageOps.exif_transpose(im)
        elif isinstance(x, (bytes, bytearray)):
            with Image.open(io.BytesIO(x)) as im:
                im.load()
                img = ImageOps.exif_transpose(im)
        elif isinstance(x, Image.Image):
            x.load()
            img = ImageOps.exif_transpose(x)
        elif isinstance(x, np.ndarray):
            img = _from_array(x, label)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            if t.ndim == 3 and t.shape[0] in (1, 3, 4):
                t = t.permute(1, 2, 0)  # tensors are channel-first by convention
            img = _from_array(t.numpy(), label)
        else:
            raise ImageInputError(f"{label}: unsupported image input type {type(x).__name__}")
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageInputError(f"{label}: cannot decode image ({msg})") from None
    if img.size[0] == 0 or img.size[1] == 0:
        raise ImageInputError(f"{label}: image has zero size {img.size[0]}x{img.size[1]}")
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise ImageInputError(f"{label}: cannot convert image to RGB ({e})") from None


def _from_array(arr: np.ndarray, label: str) -> Image.Image:
    if arr.size == 0:
        raise ImageInputError(f"{label}: image has zero size {tuple(arr.shape)}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(_to_8bit(arr), mode="L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr8 = np.ascontiguousarray(_to_8bit(arr))
        return Image.fromarray(arr8, mode="RGB" if arr.shape[-1] == 3 else "RGBA")
    raise ImageInputError(f"{label}: expected an image array [H, W], [H, W, 3|4] or tensor [3, H, W], got {tuple(arr.shape)}")


def target_size(height: int, width: int, policy: ResizePolicy, label: str = "image") -> tuple[int, int]:
    """(height, width) in pixels after the resize policy; both multiples of policy.factor."""
    if height <= 0 or width <= 0:
        raise ImageInputError(f"{label}: image has zero size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageInputError(
            f"{label}: aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}"
        )
    f = policy.factor
    if height * width > policy.max_pixels and policy.oversize == "error":
        raise ImageInputError(
            f"{label}: {width}x{height} = {width * height} pixels exceeds max_pixels={policy.max_pixels} "
            "(set oversize: resize to scale it down)"
        )
    h = max(f, round(height / f) * f)
    w = max(f, round(width / f) * f)
    if h * w > policy.max_pixels:
        beta = math.sqrt(height * width / policy.max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
        while h * w > policy.max_pixels:  # extreme aspect ratios clamped to one row of factor
            if h >= w and h > f:
                h -= f
            elif w > f:
                w -= f
            else:
                break
    elif h * w < policy.min_pixels:
        beta = math.sqrt(policy.min_pixels / (height * width))
        h = math.ceil(height * beta / f) * f
        w = math.ceil(width * beta / f) * f
    return h, w


def token_grid(height: int, width: int, policy: ResizePolicy, label: str = "image") -> tuple[int, int]:
    """(rows, cols) of ViQ tokens (each covering factor x factor pixels) for an image of that size."""
    h, w = target_size(height, width, policy, label)
    return h // policy.factor, w // policy.factor


def preprocess(x: Any, policy: ResizePolicy, name: str | None = None) -> torch.Tensor:
    """Any image input -> normalised float tensor [3, H, W] with H, W multiples of policy.factor."""
    return normalize(load_resized(x, policy, name), policy)


def load_resized(x: Any, policy: ResizePolicy, name: str | None = None) -> torch.Tensor:
    """Any image input -> uint8 tensor [3, H, W] resized by the policy (the CPU part of preprocess:
    decode workers hand this over, a quarter of the float tensor's bytes)."""
    label = describe(x, name)
    img = load_image(x, name=label)
    h, w = target_size(img.size[1], img.size[0], policy, label)
    if (img.size[1], img.size[0]) != (h, w):
        img = img.resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, policy: ResizePolicy) -> torch.Tensor:
    """uint8 [3, H, W] -> the ViT's normalised fp32 input, on the tensor's device. Each step is
    one correctly rounded fp32 operation, so CPU and GPU give the same values."""
    arr = pixels.float() / 255.0
    mean = torch.tensor(policy.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(policy.std, device=pixels.device).view(3, 1, 1)
    return (arr - mean) / std


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] -> [H/p * W/p, 3*p*p] patches in raster order."""
    c, h, w = pixels.shape
    p = patch_size
    x = pixels.reshape(c, h // p, p, w // p, p)
    return x.permute(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)
