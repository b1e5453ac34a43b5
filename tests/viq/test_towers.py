"""A ViT started from a Hugging Face vision tower computes the tower's own features.

Each tower is built by transformers from a tiny config, every weight perturbed (so that zero
initialisations such as InternViT's position grid count too), saved to a temporary directory,
loaded through `viq.towers` and compared with transformers' forward, fp32 on CPU.
"""
import json

import pytest
import torch
from einops import rearrange

from viq.config import ConfigError
from viq.errors import MissingFileError
from viq.model import ViQConfig, get_preset
from viq.towers import read_tower
from viq.vit import AnyResViT

SIGLIP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=56, patch_size=14)
INTERNVIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=56,
                 patch_size=14, hidden_act="gelu")


def _towers():
    from transformers import (InternVLVisionConfig, InternVLVisionModel, Siglip2VisionConfig, Siglip2VisionModel,
                              SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

    return {
        "siglip_vision": lambda: SiglipVisionModel(SiglipVisionConfig(**SIGLIP)),
        "siglip_full": lambda: SiglipModel(SiglipConfig(
            vision_config=SIGLIP, text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=40, vocab_size=64))),
        "siglip2_naflex": lambda: Siglip2VisionModel(Siglip2VisionConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, patch_size=8, num_patches=16)),
        # InternViT-300M's parts: q/k/v bias, LayerNorm, layer scale, no final norm
        "internvit_300m": lambda: InternVLVisionModel(InternVLVisionConfig(
            **INTERNVIT, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", use_mean_pooling=True)),
        # InternViT-6B's: no q/k/v bias, QK-norm, RMSNorm; and a final LayerNorm
        "internvit_6b": lambda: InternVLVisionModel(InternVLVisionConfig(
            **INTERNVIT, attention_bias=False, use_qk_norm=True, norm_type="rms_norm", use_mean_pooling=False)),
    }


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    out = {}
    for i, (name, build) in enumerate(_towers().items()):
        torch.manual_seed(i)
        model = build().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def vit_for(path, layers=0, **base):
    tower = read_tower(path)
    cfg, _ = tower.vit_config(ViQConfig(**base), layers=layers)
    torch.manual_seed(0)
    vit = AnyResViT(cfg).eval()
    return vit, tower.load_into(vit)


def reference(name, model, pixels, layer=None):
    """transformers' own patch features [gh, gw, C] (and class token) for one image [3, H, W]."""
    _, H, W = pixels.shape
    with torch.no_grad():
        if name.startswith("siglip2"):
            p = model.config.patch_size
            flat = rearrange(pixels, "c (gh p1) (gw p2) -> 1 (gh gw) (p1 p2 c)", p1=p, p2=p)  # the NaFlex processor's layout
            out = model(pixel_values=flat, pixel_attention_mask=torch.ones(flat.shape[:2], dtype=torch.long),
                        spatial_shapes=torch.tensor([[H // p, W // p]]), output_hidden_states=layer is not None)
            cls, p = None, p
        elif name.startswith("siglip"):
            tower = model.vision_model if name == "siglip_full" else model
            p = tower.config.patch_size
            native = H == W == tower.config.image_size
            out = tower(pixel_values=pixels[None], interpolate_pos_encoding=not native, output_hidden_states=layer is not None)
            cls = None
        else:
            p = model.config.patch_size[0]
            out = model(pixel_values=pixels[None], output_hidden_states=layer is not None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        if name.startswith("internvit"):
            cls, hidden = hidden[0, 0], hidden[:, 1:]
    return hidden[0].reshape(H // p, W // p, -1), cls


# (height, width) in pixels: the native square grid first, then a non-square and a non-native one
SIZES = {
    "siglip_vision": [(56, 56), (84, 112), (112, 56)],
    "siglip_full": [(56, 56), (84, 112)],
    "siglip2_naflex": [(32, 32), (48, 64), (16, 32)],  # 16 x 32: fewer patches than the grid, antialiased
    "internvit_300m": [(56, 56), (84, 112), (112, 56)],
    "internvit_6b": [(56, 56), (84, 112)],
}


@pytest.mark.parametrize("name", list(SIZES))
def test_loaded_tower_computes_the_reference_features(tower_dirs, name):
    path, model = tower_dirs[name]
    vit, report = vit_for(path, patch_size=8 if name.startswith("siglip2") else 14)
    torch.manual_seed(1)
    images = [torch.randn(3, h, w) for h, w in SIZES[name]]
    with torch.no_grad():
        ours, cls = vit.patch_features(images)  # all sizes packed into one sequence
    for i, (img, feats) in enumerate(zip(images, ours)):
        ref, ref_cls = reference(name, model, img)
        assert feats.shape == ref.shape
        torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name} {SIZES[name][i]}: {m}")
        if ref_cls is not None:  # InternViT's class token attends jointly, as in the tower
            torch.testing.assert_close(cls[i], ref_cls, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(cls).all()
    new = set(report.new)
    assert "merge" in new and ("cls_token" in new) == name.startswith("siglip")


def test_readout_class_token_is_what_keeps_siglip_patches_exact(tower_dirs):
    """The same weights with a joint class token: the patches attend to it and drift from the reference."""
    path, model = tower_dirs["siglip_vision"]
    vit, _ = vit_for(path)
    vit.cfg.class_token = "joint"
    img = torch.randn(3, 56, 56)
    with torch.no_grad():
        (feats,), _ = vit.patch_features([img])
    assert (feats - reference("siglip_vision", model, img)[0]).abs().max() > 1e-2


def test_fewer_layers_give_the_intermediate_features_without_the_post_norm(tower_dirs):
    """LLaVA-OneVision's SigLIP: the blocks but the last, no post-LayerNorm (hidden_states[-2])."""
    path, model = tower_dirs["siglip_vision"]
    vit, report = vit_for(path, layers=1)
    assert vit.cfg.depth == 1 and not vit.cfg.final_norm
    assert report.dropped[:2] == ["encoder.layers.1", "post_layernorm"]
    assert report.dropped[2:] == ["head.probe", "head.attention", "head.layernorm", "head.mlp"]  # SigLIP's pooling head
    img = torch.randn(3, 84, 56)
    with torch.no_grad():
        (feats,), _ = vit.patch_features([img])
    torch.testing.assert_close(feats, reference("siglip_vision", model, img, layer=1)[0], atol=1e-4, rtol=1e-4)


def test_report_names_what_is_loaded_new_and_dropped(tower_dirs):
    _, report = vit_for(tower_dirs["siglip_full"][0])
    assert report.new == ["cls_token", "merge"]
    assert report.dropped == ["logit_scale", "logit_bias", "text_model.embeddings", "text_model.encoder.layers.0",
                              "text_model.final_layer_norm", "text_model.head", "vision_model.head"]
    assert not any(d.startswith("vision_model.encoder") for d in report.dropped)
    assert "blocks.0.attn.qkv.weight" in report.loaded and "pos_embed" in report.loaded
    lines = report.lines("DIR")
    assert lines[0].startswith("init_vit_from DIR: loaded ") and "dropped from the tower: " in lines[2]


def test_tower_architecture_replaces_the_base_config_and_is_logged(tower_dirs):
    tower = read_tower(tower_dirs["internvit_300m"][0])
    cfg, changed = tower.vit_config(get_preset("viq-tiny"))
    assert changed["width"] == (192, 64) and changed["rope"] == (True, False) and changed["mlp_act"] == ("gelu_tanh", "gelu")
    assert cfg.image_mean == [0.485, 0.456, 0.406] and cfg.bottleneck_dim == 48  # the quantiser stays the base's
    assert cfg.resize_policy.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("preset,config_class,kwargs,layers", [
    ("viq-siglip-so400m", "SiglipVisionConfig",
     dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
          patch_size=14), 26),
    ("viq-siglip2-so400m", "Siglip2VisionConfig",
     dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=16,
          num_patches=256), 0),
    ("viq-internvit-300m", "InternVLVisionConfig",
     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, attention_bias=True,
          image_size=448, patch_size=14, layer_scale_init_value=0.1, use_mean_pooling=True), 0),
])
def test_tower_presets_have_the_released_towers_architecture(tmp_path, preset, config_class, kwargs, layers):
    import transformers

    getattr(transformers, config_class)(**kwargs).save_pretrained(tmp_path)  # the config alone: no weights needed
    _, changed = read_tower(tmp_path).vit_config(get_preset(preset), layers=layers)
    assert changed == {}


def test_towers_that_cannot_be_represented_are_refused_in_one_line(tmp_path, tower_dirs):
    from transformers import InternVLVisionConfig, Qwen2Config, SiglipVisionConfig

    with pytest.raises(MissingFileError, match="is not a local model directory"):
        read_tower(tmp_path / "absent")
    cases = {
        "no_abs": (InternVLVisionConfig(use_absolute_position_embeddings=False), "use_absolute_position_embeddings=false"),
        "relu": (SiglipVisionConfig(hidden_act="relu"), "hidden_act 'relu' cannot be represented"),
        "qwen": (Qwen2Config(), "Qwen2Config is not a supported vision tower; supported: SiglipVisionConfig"),
    }
    for name, (config, message) in cases.items():
        config.save_pretrained(tmp_path / name)
        with pytest.raises(ConfigError, match=message) as e:
            read_tower(tmp_path / name).architecture()
        assert "\n" not in str(e.value)
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "intern_vit_6b"}))
    with pytest.raises(ConfigError, match="remote-code InternViT"):
        read_tower(tmp_path / "remote")
    with pytest.raises(ConfigError, match=r"init_vit_layers=5: the tower .* has 2 layers"):
        read_tower(tower_dirs["siglip_vision"][0]).architecture(5)
    vit = AnyResViT(ViQConfig())  # viq-tiny's ViT: not the tower's shape
    with pytest.raises(ConfigError, match=r"does not have this tower's architecture: width=192 \(tower: 64\)"):
        read_tower(tower_dirs["siglip_vision"][0]).load_into(vit)


def test_a_tokenizer_with_every_tower_option_saves_and_reloads(tmp_path):
    from viq.model import ViQModel

    cfg = ViQConfig(width=64, depth=2, heads=4, mlp_dim=96, pos_grid=4, rope=False, class_token="readout",
                    pos_interpolation="bicubic", mlp_act="gelu", norm_type="rms_norm", qkv_bias=False, qk_norm=True,
                    layer_scale=0.1, final_norm=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model = ViQModel.from_config(cfg).eval()
    model.save_pretrained(tmp_path)
    again = ViQModel.from_pretrained(tmp_path)
    assert again.config == cfg
    image = (torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy()
    assert torch.equal(model.encode([image])[0], again.encode([image])[0])
    assert model.preprocess([image])[0].mean() == pytest.approx(float(torch.as_tensor(image).float().mean() / 127.5 - 1), abs=0.05)
