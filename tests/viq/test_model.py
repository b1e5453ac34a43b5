import json

import numpy as np
import pytest
import torch
from PIL import Image

from viq import ViQModel
from viq.config import ConfigError
from viq.model import VIQ_PRESETS, get_preset
from viq.quantizer import linf_normalize

SIZES = [(100, 200), (448, 448), (28, 896), (333, 57), (56, 56), (896, 28)]


@pytest.fixture(scope="module")
def model():
    return ViQModel.from_pretrained("viq-tiny")


def rand_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_encode_shapes_follow_resize_policy(model):
    codes = model.encode(rand_images(SIZES))
    assert [tuple(c.shape) for c in codes] == [(4, 7, 4), (16, 16, 4), (1, 32, 4), (12, 2, 4), (2, 2, 4), (32, 1, 4)]
    for c in codes:
        assert c.dtype == torch.int64
        assert c.min() >= 0 and c.max() < model.codebook_size


def test_packing_invariance(model):
    images = rand_images(SIZES, seed=1)
    packed_pixels = model.preprocess(images)
    packed = model(packed_pixels)
    split = [h * w for h, w in packed["grids"]]
    for i, pixels in enumerate(packed_pixels):
        alone = model([pixels])
        assert torch.equal(alone["indices"], packed["indices"].split(split)[i])
        assert torch.allclose(alone["quantized"], packed["quantized"].split(split)[i], atol=1e-5)
        assert torch.allclose(alone["features"], packed["features"].split(split)[i], atol=1e-5)
        assert torch.allclose(alone["class_tokens"], packed["class_tokens"][i : i + 1], atol=1e-5)
    one_by_one = [model.encode([img])[0] for img in images]
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, model.encode(images)))


def test_token_budget_batching_gives_same_codes(model):
    images = rand_images(SIZES, seed=2)
    ref = model.encode(images)
    small = ViQModel.from_pretrained("viq-tiny")
    small.config.max_tokens_per_batch = 700
    assert all(torch.equal(a, b) for a, b in zip(ref, small.encode(images)))


def test_training_forward_outputs(model):
    out = model(model.preprocess(rand_images([(64, 96), (120, 40)])))
    n = sum(h * w for h, w in out["grids"])
    cfg = model.config
    assert out["features"].shape == (n, cfg.width)
    assert out["quantized"].shape == (n, cfg.feature_dim)
    assert out["class_tokens"].shape == (2, cfg.width)
    assert out["indices"].shape == (n, 4)
    assert torch.allclose(out["bottleneck"].abs().amax(-1), torch.ones(n))
    assert 0 < out["stats"]["codebook_usage"] <= 1 and out["stats"]["codebook_perplexity"] >= 1


def test_gradients_reach_the_vit_through_fsq():
    m = ViQModel.from_pretrained("viq-tiny")
    m.train()
    out = m(m.preprocess(rand_images([(56, 84)])))
    out["quantized"].square().mean().backward()
    assert m.vit.patch_embed.weight.grad is not None and m.vit.patch_embed.weight.grad.abs().sum() > 0


def test_embed_codes_matches_forward(model):
    pixels = model.preprocess(rand_images([(84, 140)]))
    out = model(pixels)
    h, w = out["grids"][0]
    feats = model.embed_codes(out["indices"].reshape(h, w, 4))
    assert feats.shape == (h, w, model.config.feature_dim)
    assert torch.allclose(feats.reshape(h * w, -1), out["quantized"], atol=1e-5)
    with pytest.raises(ValueError, match="must lie in"):
        model.embed_codes(torch.full((1, 4), model.codebook_size))


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["model_type"] == "viq" and cfg["levels"] == model.config.levels
    loaded = ViQModel.from_pretrained(tmp_path / "tok")
    images = rand_images(SIZES[:3], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.encode(images), loaded.encode(images)))


def test_preset_is_deterministic():
    images = rand_images([(70, 70)])
    a = ViQModel.from_pretrained("viq-tiny").encode(images)[0]
    b = ViQModel.from_pretrained("viq-tiny").encode(images)[0]
    assert torch.equal(a, b)


def test_presets_and_errors(tmp_path):
    assert set(VIQ_PRESETS) == {"viq-tiny", "viq-1.3b", "viq-siglip-so400m", "viq-siglip2-so400m", "viq-internvit-300m"}
    with torch.device("meta"):
        big = ViQModel(get_preset("viq-1.3b"))
    n = sum(p.numel() for p in big.parameters())
    assert 1.2e9 < n < 1.4e9
    tiny = sum(p.numel() for p in ViQModel.from_pretrained("viq-tiny").parameters())
    assert 1e6 < tiny < 10e6
    with pytest.raises(ConfigError, match="valid presets: viq-tiny, viq-1.3b"):
        ViQModel.from_pretrained("viq-huge")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"width": 64, "colour": 1}))
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        ViQModel.from_pretrained(tmp_path / "bad")


def test_linf_normalize_on_hypercube_surface():
    x = torch.randn(100, 16) * 5
    y = linf_normalize(x)
    assert torch.allclose(y.abs().amax(-1), torch.ones(100))
    assert torch.allclose(y * x.abs().amax(-1, keepdim=True), x, atol=1e-5)


def test_centred_bottleneck_subtracts_the_mean_token_and_is_saved(tmp_path):
    m = ViQModel.from_pretrained("viq-tiny")
    q = m.quantizer
    assert q.bottleneck.bias is None  # a trainable shared offset would send every token to one corner
    tokens = torch.randn(12, m.config.width) + 5.0 * torch.randn(m.config.width)  # large shared component
    grids, cu = [(3, 4)], torch.tensor([0, 12], dtype=torch.int32)
    shifted = q(tokens - tokens.mean(0), grids, cu)
    q.center_bottleneck(tokens.mean(0))
    centred = q(tokens, grids, cu)
    assert torch.equal(centred["indices"], shifted["indices"])
    assert len(centred["indices"].unique()) > 1
    m.save_pretrained(tmp_path / "c")
    assert torch.equal(ViQModel.from_pretrained(tmp_path / "c").quantizer.token_mean, tokens.mean(0))


def test_centre_follows_the_tokens_when_momentum_is_set():
    m = ViQModel.from_pretrained("viq-tiny")
    q = m.quantizer
    tokens = torch.randn(8, m.config.width) + 3.0
    grids, cu = [(2, 4)], torch.tensor([0, 8], dtype=torch.int32)
    q.train()
    q(tokens, grids, cu)
    assert torch.equal(q.token_mean, torch.zeros(m.config.width))  # momentum 0: a fixed centre
    m.config.center_momentum = 0.5
    q(tokens, grids, cu)
    assert torch.allclose(q.token_mean, 0.5 * tokens.mean(0))
    q.eval()
    q(tokens, grids, cu)
    assert torch.allclose(q.token_mean, 0.5 * tokens.mean(0))  # never moves at inference
