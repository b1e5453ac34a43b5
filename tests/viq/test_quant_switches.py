"""The quantiser's ablation switches (viq.quant): shapes, gradients, codebook round trips, persistence."""
import numpy as np
import pytest
import torch
from PIL import Image

from viq import ViQModel
from viq.config import ConfigError
from viq.model import ViQConfig, get_preset
from viq.quantizer import QuantConfig
from viq.simvq import SimVQ

SWITCHES = {
    "no_proximal": QuantConfig(proximal=False),
    "no_rope": QuantConfig(rope=False),
    "simvq": QuantConfig(kind="simvq"),
}


def tiny(quant: QuantConfig) -> ViQModel:
    cfg = get_preset("viq-tiny")
    cfg.quant = quant
    return ViQModel.from_config(cfg)


def pixels(model, sizes=((56, 84), (84, 56)), seed=0):
    rng = np.random.default_rng(seed)
    return model.preprocess([Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes])


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_shapes_gradients_and_embed_round_trip(name):
    model = tiny(SWITCHES[name])
    model.train()
    out = model(pixels(model))
    n = sum(h * w for h, w in out["grids"])
    assert out["indices"].shape == (n, 4) and out["quantized"].shape == (n, model.config.feature_dim)
    assert 0 <= int(out["indices"].min()) and int(out["indices"].max()) < model.codebook_size
    loss = out["quantized"].square().mean() + out.get("commit_loss", 0)
    loss.backward()
    # the straight-through gradient reaches the ViT, and every trainable quantiser tensor gets one
    assert model.vit.patch_embed.weight.grad.abs().sum() > 0
    assert model.quantizer.down.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        again = model(pixels(model))
        assert torch.allclose(model.embed_codes(again["indices"]), again["quantized"], atol=1e-5)


def test_no_proximal_reads_the_features_directly():
    model = tiny(QuantConfig(proximal=False))
    assert not hasattr(model.quantizer, "bottleneck")
    assert model.quantizer.down.in_features == model.config.width
    assert model(pixels(model))["bottleneck"] is None
    assert tiny(QuantConfig())(pixels(model))["bottleneck"].abs().amax(-1).allclose(torch.ones(1))


def test_without_rope_the_codes_do_not_see_token_positions():
    """Swapping two tokens of an image swaps their pre-quantisation features (and codes) without
    RoPE; with RoPE the features change."""
    def swapped(quant):
        q = tiny(quant).quantizer.eval()
        torch.manual_seed(0)
        g = torch.randn(6, q.cfg.quant_dim)
        cu = torch.tensor([0, 6], dtype=torch.int32)
        perm = torch.tensor([5, 1, 2, 3, 4, 0])
        with torch.no_grad():
            return q.expand(g, [(2, 3)], cu)[perm], q.expand(g[perm], [(2, 3)], cu)

    a, b = swapped(QuantConfig(rope=False))
    assert torch.allclose(a, b, atol=1e-6)
    a, b = swapped(QuantConfig())
    assert (a - b).abs().max() > 1e-3


def test_simvq_codebook_round_trip_and_commitment():
    vq = SimVQ(1000, 8)
    codebook = vq.codebook()
    assert codebook.shape == (1000, 8)
    idx = torch.arange(1000)
    codes, again, commit = vq.quantize(vq.indices_to_codes(idx))
    assert torch.equal(again, idx) and torch.allclose(codes, codebook) and float(commit) < 1e-10
    # a chunked search agrees with the dense one
    z = torch.randn(50, 8, requires_grad=True)
    vq.chunk = 7
    _, chunked, _ = vq.quantize(z)
    assert torch.equal(chunked, torch.cdist(z.detach(), codebook).argmin(-1))
    # both terms train: the projection W (codebook side) and the encoder output (commitment)
    codes, _, commit = vq.quantize(z)
    commit.backward()
    assert vq.proj.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert vq.frozen_codebook.requires_grad is False


def test_simvq_tokenizer_saves_and_loads_with_its_codebook(tmp_path):
    model = tiny(QuantConfig(kind="simvq", simvq_codebook_size=300, simvq_dim=4)).eval()
    assert model.codebook_size == 300 and model.codebook_vectors().shape == (300, 4)
    model.save_pretrained(tmp_path)
    loaded = ViQModel.from_pretrained(tmp_path)
    assert loaded.config.quant == model.config.quant
    px = pixels(model, sizes=((84, 112),))
    assert torch.equal(loaded.encode_pixels(px)[0], model.encode_pixels(px)[0])


def test_quant_config_errors_and_old_configs():
    with pytest.raises(ConfigError, match="viq.quant.kind is 'vq'; valid values: fsq, simvq"):
        ViQConfig.from_dict({"quant": {"kind": "vq"}})
    with pytest.raises(ConfigError, match="unknown config key 'quant.rop'"):
        ViQConfig.from_dict({"quant": {"rop": False}})
    # a config.json written before the switches existed builds the paper's quantiser
    old = ViQConfig().to_dict()
    del old["quant"]
    assert ViQConfig.from_dict(old).quant == QuantConfig()
    assert get_preset("viq-tiny").quant is not get_preset("viq-tiny").quant
