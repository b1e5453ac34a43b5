import io

import numpy as np
import pytest
import torch
from PIL import Image

from viq import ImageInputError, ViQModel, load_image
from viq.image import ResizePolicy, target_size, token_grid


@pytest.fixture(scope="module")
def model():
    return ViQModel.from_pretrained("viq-tiny")


def test_resize_policy():
    p = ResizePolicy(max_pixels=448 * 448, min_pixels=28 * 28 * 4)
    assert target_size(448, 448, p) == (448, 448)
    assert target_size(100, 200, p) == (112, 196)
    assert target_size(10, 10, p) == (56, 56)  # upscaled to min_pixels
    h, w = target_size(4000, 3000, p)
    assert h * w <= 448 * 448 and h % 28 == 0 and w % 28 == 0 and abs(h / w - 4 / 3) < 0.1
    assert token_grid(28, 896, p) == (1, 32)
    with pytest.raises(ImageInputError, match="aspect ratio"):
        target_size(10, 5000, p)


def test_oversize_error_policy():
    p = ResizePolicy(max_pixels=100 * 100, oversize="error")
    with pytest.raises(ImageInputError, match=r"big\.png: 200x200 = 40000 pixels exceeds max_pixels=10000"):
        target_size(200, 200, p, "big.png")


def test_corrupt_and_truncated_files(tmp_path, model):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageInputError, match="corrupt.png: cannot decode image"):
        model.encode([str(bad)])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(buf, format="PNG")
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageInputError, match="truncated.png: cannot decode image"):
        model.encode([str(trunc)])
    with pytest.raises(ImageInputError, match="missing.png: image file not found"):
        model.encode([str(tmp_path / "missing.png")])


def test_zero_size_image(model):
    with pytest.raises(ImageInputError, match="zero size"):
        model.encode([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(ImageInputError, match="zero size"):
        model.encode([Image.new("RGB", (0, 5))])


def test_mode_conversions_are_deterministic():
    gray = Image.fromarray(np.full((4, 4), 77, np.uint8), mode="L")
    assert load_image(gray).getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white background
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    pal = Image.new("P", (4, 4))
    pal.putpalette([10, 20, 30] * 256)
    assert load_image(pal).getpixel((0, 0)) == (10, 20, 30)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert load_image(deep).getpixel((0, 0)) == (255, 255, 255)
    arr16 = np.full((4, 4, 3), 257 * 100, np.uint16)
    assert load_image(arr16).getpixel((0, 0)) == (100, 100, 100)
    t = torch.zeros(3, 4, 4)
    t[1] = 1.0
    assert load_image(t).getpixel((0, 0)) == (0, 255, 0)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(str(path)).size == (20, 40)
    assert load_image(path.read_bytes()).size == (20, 40)


def test_inputs_of_all_kinds_give_same_codes(model, tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    inputs = [str(path), path.read_bytes(), Image.fromarray(arr), arr, torch.from_numpy(arr).permute(2, 0, 1)]
    codes = model.encode(inputs)
    assert all(torch.equal(codes[0], c) for c in codes[1:])


def test_unsupported_input_type(model):
    with pytest.raises(ImageInputError, match="unsupported image input type dict"):
        model.encode([{"a": 1}])
