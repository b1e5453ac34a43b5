"""ViQ decoder: latent head shapes and layout, the VAE-latent target, decoding, persistence."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from viq import ViQModel  # noqa: E402
from viq.config import ConfigError  # noqa: E402
from viq.decoder import (  # noqa: E402
    DecoderConfig,
    LatentHead,
    ViQDecoder,
    latent_regression_loss,
    tiny_vae,
    unnormalize_pixels,
    vae_latent_target,
)


@pytest.fixture(scope="module")
def viq():
    return ViQModel.from_pretrained("viq-tiny")


@pytest.fixture(scope="module")
def decoder(viq):
    return ViQDecoder.from_vae(tiny_vae(0), feature_dim=viq.config.feature_dim, hidden_size=32, depth=1)


def test_latent_head_shapes_and_token_layout():
    torch.manual_seed(0)
    head = LatentHead(DecoderConfig(feature_dim=12, latent_channels=4, hidden_size=16, depth=2))
    feats = torch.randn(2 * 3 + 1, 12)
    assert head(feats).shape == (7, 4, 4, 4)
    assert torch.equal(head(feats), torch.zeros(7, 4, 4, 4))  # zero output at init (see LatentHead)
    torch.nn.init.normal_(head.proj_out.weight)
    lat = head.latents(feats, [(2, 3), (1, 1)])
    assert [tuple(x.shape) for x in lat] == [(4, 8, 12), (4, 4, 4)]
    # Token (r, c) of the raster order owns exactly latent cells [4r:4r+4, 4c:4c+4].
    bumped = feats.clone()
    bumped[1 * 3 + 2] += 1.0  # token at row 1, column 2 of the first image
    changed = (head.latents(bumped, [(2, 3), (1, 1)])[0] != lat[0]).any(dim=0)
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(changed, expected)
    assert torch.equal(head.latents(bumped, [(2, 3), (1, 1)])[1], lat[1])


def test_latent_head_rejects_wrong_shapes():
    head = LatentHead(DecoderConfig(feature_dim=12, hidden_size=16, depth=0))
    with pytest.raises(ValueError, match=r"features \[N, 12\], got \(5, 13\)"):
        head(torch.zeros(5, 13))
    with pytest.raises(ValueError, match="cover 6 tokens, features have 5"):
        head.latents(torch.zeros(5, 12), [(2, 3)])


def test_latent_regression_loss_values():
    a = [torch.zeros(4, 8, 8), torch.zeros(4, 4, 12)]
    b = [torch.ones(4, 8, 8), torch.zeros(4, 4, 12)]
    assert latent_regression_loss(a, a).item() == 0.0
    assert latent_regression_loss(a, b).item() == pytest.approx(256 / (256 + 192))
    with pytest.raises(ValueError, match=r"image 1: predicted latents \(4, 4, 12\) vs target \(4, 4, 8\)"):
        latent_regression_loss(a, [b[0], torch.zeros(4, 4, 8)])


def test_vae_latent_target_is_scaled_posterior_mean():
    vae = tiny_vae(0)
    torch.manual_seed(1)
    exact = torch.rand(3, 64, 96)  # already (32h, 32w) for a 2 x 3 grid: no resize
    other = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)  # 2 x 3 tokens of 28 px: resized to 64 x 96
    small = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    targets = vae_latent_target(vae, [exact, small, other], [(2, 3), (1, 1), (2, 3)])
    assert [tuple(t.shape) for t in targets] == [(4, 8, 12), (4, 4, 4), (4, 8, 12)]
    with torch.no_grad():
        mean = vae.encode(exact[None] * 2 - 1).latent_dist.mean[0]
    torch.testing.assert_close(targets[0], mean * vae.config.scaling_factor, atol=1e-5, rtol=1e-5)
    # Batched by grid == one image at a time; uint8 and [0, 1] floats are the same pixels.
    alone = vae_latent_target(vae, [other.float() / 255], [(2, 3)])[0]
    torch.testing.assert_close(targets[2], alone, atol=1e-5, rtol=1e-5)


def test_unnormalize_pixels_inverts_viq_preprocess(viq):
    img = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    pixels = viq.preprocess([img])[0]
    torch.testing.assert_close(unnormalize_pixels(pixels), img.float() / 255, atol=1e-6, rtol=0)


def test_decode_codes_shapes_and_consistency(viq, decoder):
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 84, 140), dtype=torch.uint8), torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8)]
    codes = viq.encode(images)
    assert [tuple(c.shape[:2]) for c in codes] == [(3, 5), (2, 2)]
    out = decoder.decode_codes(viq, codes)
    assert [tuple(o.shape) for o in out] == [(3, 84, 140), (3, 56, 56)]
    assert all(o.dtype == torch.uint8 for o in out)
    # decode_codes = embed_codes -> head -> VAE decoder, image by image.
    feats = viq.embed_codes(codes[1]).reshape(-1, viq.config.feature_dim)
    assert torch.equal(decoder.decode_latents(decoder.head.latents(feats, [(2, 2)]))[0], out[1])


def test_reconstruct_returns_pixel_aligned_pairs(viq, decoder):
    img = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)  # already on the 28-px grid
    odd = torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8)  # resized by the policy to 56 x 112 (round(2.5) = 2 rows)
    originals, recons = decoder.reconstruct(viq, [img, odd])
    assert torch.equal(originals[0], img)
    assert [tuple(o.shape) for o in originals] == [(3, 56, 84), (3, 56, 112)]
    assert [tuple(r.shape) for r in recons] == [(3, 56, 84), (3, 56, 112)]
    assert all(torch.equal(a, b) for a, b in zip(recons, decoder.decode_codes(viq, viq.encode(originals))))


def test_head_learns_the_vae_target(viq):
    dec = ViQDecoder.from_vae(tiny_vae(0), feature_dim=viq.config.feature_dim, hidden_size=32, depth=1)
    img = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    out = viq.forward(viq.preprocess([img]))
    target = vae_latent_target(dec.vae, [img], out["grids"])
    feats = out["quantized"].detach()
    opt = torch.optim.Adam(dec.head.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = latent_regression_loss(dec.head.latents(feats, out["grids"]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(not p.requires_grad for p in dec.vae.parameters())


def test_save_load_round_trip(tmp_path, viq, decoder):
    viq.save_pretrained(tmp_path)
    folder = decoder.save_pretrained(tmp_path)
    for name in ("config.json", "latent_head.safetensors", "vae/config.json"):
        assert (tmp_path / "decoder" / name).is_file()
    loaded = ViQDecoder.from_pretrained(tmp_path)
    assert loaded.config == decoder.config
    for key, value in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    codes = ViQModel.from_pretrained(tmp_path).encode([torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8)])
    assert torch.equal(loaded.decode_codes(viq, codes)[0], decoder.decode_codes(viq, codes)[0])
    assert folder == str(tmp_path / "decoder")


def test_missing_or_bad_decoder_errors(tmp_path, viq, decoder):
    viq.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"has no decoder \(missing decoder/config.json\)"):
        ViQDecoder.from_pretrained(tmp_path)
    decoder.save_pretrained(tmp_path)
    cfg = tmp_path / "decoder" / "config.json"
    raw = json.loads(cfg.read_text())
    raw["hiden_size"] = raw.pop("hidden_size")
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hiden_size"):
        ViQDecoder.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a local AutoencoderKL directory"):
        ViQDecoder.from_vae(tmp_path / "nowhere", feature_dim=8)


def test_vae_and_tokenizer_mismatches_are_refused(viq):
    from diffusers import AutoencoderKL

    three_blocks = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=4,
    )
    with pytest.raises(ConfigError, match="downsampling factor 4 .* needs 8"):
        ViQDecoder.from_vae(three_blocks, feature_dim=8)
    with pytest.raises(ConfigError, match="latent_channels is 8 but the VAE has 4"):
        ViQDecoder(DecoderConfig(feature_dim=8, latent_channels=8), tiny_vae(0))
    other = ViQDecoder.from_vae(tiny_vae(0), feature_dim=viq.config.feature_dim + 1, hidden_size=8, depth=0)
    codes = torch.zeros(1, 1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="feature_dim 193 does not match the tokenizer's feature_dim 192"):
        other.decode_codes(viq, [codes])
