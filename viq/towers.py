"""Start the ViQ ViT from a pretrained Hugging Face vision tower (SigLIP, SigLIP2 NaFlex, InternViT).

    tower = read_tower(path)                          # the tower's config, checked; nothing loaded yet
    config, changed = tower.vit_config(viq_config)    # the ViQ config with the tower's ViT architecture
    report = tower.load_into(model.vit)               # weights mapped into the AnyResViT (fp32, CPU)

Supported, by the transformers config class of the directory's config.json:
`SiglipVisionConfig` / `SiglipConfig` (SigLIP, e.g. so400m-patch14-384), `Siglip2VisionConfig` /
`Siglip2Config` (SigLIP2 NaFlex) and `InternVLVisionConfig` (InternViT-300M / 6B as transformers
ships them, e.g. the `vision_tower` of OpenGVLab/InternVL3-1B-hf). The model is read with the
class transformers itself maps that config to, from local files only, never with remote code.

How the tower's parts land in the ViT:
- Position: the towers have learned absolute position grids and no RoPE, so the ViT runs with
  `rope: false`; the tower's grid becomes the ViT's resizable `pos_embed`, resized per image with
  the tower's own interpolation (`bicubic` for SigLIP and InternViT, `bilinear_antialias` for
  SigLIP2), in fp32. At the native grid nothing is resized. Without RoPE the ViT's features do
  not depend on the order of the patches, so its 2x2 block layout changes nothing.
- Class token: InternViT's (plus its position embedding) is loaded and attends jointly as in
  InternViT. SigLIP has none: the ViT's class token is new and a `readout` one (it attends to its
  image, the patches never attend to it), so the patch features stay the tower's own while stage
  1's self-distillation still has a class token to compare.
- Architecture options the ViT gains for this (`viq.model.ViQConfig`): exact GELU, RMSNorm,
  QK-norm, layer scale, no q/k/v bias, no final norm, the MLP size. Anything else a tower needs
  is refused with one line naming it.
- Depth: `layers` < the tower's depth keeps the first `layers` blocks and drops the final norm
  with the rest (LLaVA-OneVision keeps 26 of SigLIP-so400m's 27 blocks and no post-LayerNorm).
- New: the class token (SigLIP), the 2x2 merge MLP, the quantiser (and, in tokenizer training,
  the projector). Dropped: everything else in the checkpoint (SigLIP's pooling head, a text
  tower, the blocks past `layers`, InternViT's mask token). All three lists are logged.
- Pixel normalisation: the tower's `preprocessor_config.json` when the directory has one, else
  the family's (SigLIP: mean = std = 0.5; InternViT: ImageNet's).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

# config class -> (family, attribute of the model that holds the vision tower, or "")
TOWER_CLASSES = {
    "SiglipVisionConfig": ("siglip", ""),
    "SiglipConfig": ("siglip", "vision_model"),
    "Siglip2VisionConfig": ("siglip2", ""),
    "Siglip2Config": ("siglip2", "vision_model"),
    "InternVLVisionConfig": ("internvit", ""),
}
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# ViQConfig fields a tower decides (depth and final_norm also follow `layers`)
ARCHITECTURE_FIELDS = ("width", "depth", "heads", "mlp_dim", "patch_size", "pos_grid", "norm_eps", "rope", "class_token",
                       "pos_interpolation", "mlp_act", "norm_type", "qkv_bias", "qk_norm", "layer_scale", "final_norm",
                       "image_mean", "image_std")


def _one(value, key: str, where: str) -> int:
    """A square size given as an int or an (h, w) pair."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}: {key}={list(value)} is not square; the ViT's position grid is square")
        value = value[0]
    return int(value)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # ViT parameters set from the tower
    new: list[str] = field(default_factory=list)  # ViT parameters left at their initialisation
    dropped: list[str] = field(default_factory=list)  # tower parameters not used, grouped
    loaded_params: int = 0

    def lines(self, path) -> list[str]:
        return [f"init_vit_from {path}: loaded {len(self.loaded)} tensors ({self.loaded_params:,} parameters)",
                f"  new (initialised here): {', '.join(self.new) or 'nothing'}",
                f"  dropped from the tower: {', '.join(self.dropped) or 'nothing'}"]


@dataclass
class Tower:
    """A vision tower directory whose config has been read and checked (weights not loaded yet)."""

    path: Path
    config_class: str
    family: str
    vision_attr: str
    vision_config: object

    # ---- the ViT configuration ---------------------------------------------------------------
    def architecture(self, layers: int = 0) -> dict:
        """The ViQConfig fields this tower fixes; `layers` > 0 keeps only the first `layers` blocks."""
        vc, where = self.vision_config, str(self.path / "config.json")
        act = vc.hidden_act
        if act not in ACTIVATIONS:
            raise ConfigError(f"{where}: hidden_act '{act}' cannot be represented; the ViT's MLP has {', '.join(ACTIVATIONS)}")
        patch = _one(vc.patch_size, "patch_size", where)
        depth = vc.num_hidden_layers
        if layers < 0 or layers > depth:
            raise ConfigError(f"viq_train.init_vit_layers={layers}: the tower at {self.path} has {depth} layers "
                              f"(0 keeps all of them)")
        arch = {"width": vc.hidden_size, "depth": layers or depth, "heads": vc.num_attention_heads,
                "mlp_dim": vc.intermediate_size, "patch_size": patch, "norm_eps": float(vc.layer_norm_eps),
                "rope": False, "mlp_act": ACTIVATIONS[act], "norm_type": "layer_norm", "qkv_bias": True,
                "qk_norm": False, "layer_scale": 0.0}
        if self.family == "siglip":
            image = _one(vc.image_size, "image_size", where)
            arch.update(pos_grid=image // patch, class_token="readout", pos_interpolation="bicubic", final_norm=True)
        elif self.family == "siglip2":
            grid = math.isqrt(vc.num_patches)
            if grid * grid != vc.num_patches:
                raise ConfigError(f"{where}: num_patches={vc.num_patches} is not a square grid")
            arch.update(pos_grid=grid, class_token="readout", pos_interpolation="bilinear_antialias", final_norm=True)
        else:  # InternViT
            if not vc.use_absolute_position_embeddings:
                raise ConfigError(f"{where}: use_absolute_position_embeddings=false cannot be represented; the ViT needs "
                                  "the tower's learned position grid")
            if vc.norm_type not in ("layer_norm", "rms_norm"):
                raise ConfigError(f"{where}: norm_type '{vc.norm_type}' cannot be represented (layer_norm, rms_norm)")
            image = _one(vc.image_size, "image_size", where)
            arch.update(pos_grid=image // patch, class_token="joint", pos_interpolation="bicubic",
                        final_norm=not vc.use_mean_pooling, norm_type=vc.norm_type, qkv_bias=bool(vc.attention_bias),
                        qk_norm=bool(vc.use_qk_norm), layer_scale=float(vc.layer_scale_init_value) or 1.0)
            for key in ("hidden_dropout_prob", "attention_dropout", "projection_dropout"):
                if getattr(vc, key, 0):
                    log.warning(f"{where}: {key}={getattr(vc, key)} is not represented (the ViT has no dropout)")
        if layers and layers < depth:
            arch["final_norm"] = False  # the tower's final norm belongs after its last block, dropped with it
        arch["image_mean"], arch["image_std"] = self._normalisation()
        return arch

    def _normalisation(self) -> tuple[list[float], list[float]]:
        pre = self.path / "preprocessor_config.json"
        if pre.is_file():
            raw = json.loads(pre.read_text())
            if raw.get("do_normalize", True) and "image_mean" in raw and "image_std" in raw:
                return [float(v) for v in raw["image_mean"]], [float(v) for v in raw["image_std"]]
        return (IMAGENET_MEAN, IMAGENET_STD) if self.family == "internvit" else (HALF, HALF)

    def vit_config(self, base, layers: int = 0):
        """`base` (a ViQConfig) with this tower's ViT architecture: (new config, {field: (old, new)})."""
        arch = self.architecture(layers)
        changed = {k: (getattr(base, k), v) for k, v in arch.items() if getattr(base, k) != v}
        return replace(base, **arch), changed

    # ---- the weights -----------------------------------------------------------------------------
    def load_model(self):
        """The tower as transformers builds it (fp32, CPU): the full model the config names."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(self.path), local_files_only=True, dtype=torch.float32)

    def load_into(self, vit) -> LoadReport:
        """Copy the tower's weights into `vit` (an AnyResViT built from `vit_config`)."""
        arch = self.architecture(min(vit.cfg.depth, self.vision_config.num_hidden_layers))
        wrong = [f"{k}={getattr(vit.cfg, k)!r} (tower: {v!r})" for k, v in arch.items()
                 if k not in ("image_mean", "image_std") and getattr(vit.cfg, k) != v]
        if wrong:
            raise ConfigError(f"{self.path}: the ViT does not have this tower's architecture: {', '.join(wrong)}")
        model = self.load_model()
        full = {k: v for k, v in model.state_dict().items()}
        prefix = f"{self.vision_attr}." if self.vision_attr else ""
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        mapped, used = MAPPERS[self.family](state, vit.cfg)
        own = vit.state_dict()
        for key, value in mapped.items():
            if own[key].shape != value.shape:
                raise ConfigError(f"{self.path}: {key} has shape {tuple(value.shape)} in the tower, "
                                  f"{tuple(own[key].shape)} in the ViT")
        missing, unexpected = vit.load_state_dict(mapped, strict=False)
        assert not unexpected, unexpected  # the mappers only name ViT parameters
        report = LoadReport(loaded=sorted(mapped), new=sorted({k.split(".")[0] for k in missing}),
                            loaded_params=sum(v.numel() for v in mapped.values()))
        report.dropped = _group([k for k in full if k not in {prefix + u for u in used}])
        return report


def _group(names) -> list[str]:
    """Parameter names folded for a log line: 'text_model.encoder.layers.0-26', 'vision_model.head'."""
    labels, indices = [], {}
    for name in names:
        parts = name.split(".")
        if len(parts) > 1 and ("weight" in parts[-1] or "bias" in parts[-1]):
            parts = parts[:-1]
        num = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        label = ".".join(parts[:num] if num is not None else parts[:2])
        if label not in labels:
            labels.append(label)
        if num is not None:
            indices.setdefault(label, set()).add(int(parts[num]))
    return [f"{label}.{_ranges(sorted(indices[label]))}" if label in indices else label for label in labels]


def _ranges(values: list[int]) -> str:
    runs, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(runs)


def _siglip(state: dict, cfg, *, patch_from_linear: bool = False) -> tuple[dict, set]:
    """SigLIP / SigLIP2 vision model state (keys without the model prefix) -> ViT state."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return state[key]

    w = take("embeddings.patch_embedding.weight")
    if patch_from_linear:  # SigLIP2 patches are flattened (p1 p2 c); the ViT's are (c p1 p2)
        p = cfg.patch_size
        w = w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2)
    out["patch_embed.weight"] = w.reshape(w.shape[0], -1)
    out["patch_embed.bias"] = take("embeddings.patch_embedding.bias")
    out["pos_embed"] = take("embeddings.position_embedding.weight").reshape(cfg.pos_grid, cfg.pos_grid, -1)
    for i in range(cfg.depth):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                     ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
            for t in ("weight", "bias"):
                out[f"{dst}{b}.{t}"] = take(f"{src}{a}.{t}")
        for t in ("weight", "bias"):
            out[f"{dst}attn.qkv.{t}"] = torch.cat([take(f"{src}self_attn.{n}_proj.{t}") for n in "qkv"])
    if cfg.final_norm:
        for t in ("weight", "bias"):
            out[f"norm.{t}"] = take(f"post_layernorm.{t}")
    return out, used


def _siglip2(state: dict, cfg) -> tuple[dict, set]:
    return _siglip(state, cfg, patch_from_linear=True)


def _internvit(state: dict, cfg) -> tuple[dict, set]:
    """InternVLVisionModel state -> ViT state."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return state[key]

    w = take("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.weight"] = w.reshape(w.shape[0], -1)
    out["patch_embed.bias"] = take("embeddings.patch_embeddings.projection.bias")
    pos = take("embeddings.position_embeddings")[0]
    out["pos_embed"] = pos[1:].reshape(cfg.pos_grid, cfg.pos_grid, -1)
    out["cls_token"] = take("embeddings.cls_token").reshape(-1) + pos[0]  # its position embedding folded in
    norm_params = ("weight", "bias") if cfg.norm_type == "layer_norm" else ("weight",)
    for i in range(cfg.depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for a, b in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
            for t in norm_params:
                out[f"{dst}{b}.{t}"] = take(f"{src}{a}.{t}")
        for a, b in (("attention.projection_layer", "attn.proj"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
            for t in ("weight", "bias"):
                out[f"{dst}{b}.{t}"] = take(f"{src}{a}.{t}")
        out[f"{dst}attn.qkv.weight"] = torch.cat([take(f"{src}attention.{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            out[f"{dst}attn.qkv.bias"] = torch.cat([take(f"{src}attention.{n}_proj.bias") for n in "qkv"])
        if cfg.qk_norm:
            out[f"{dst}attn.q_norm.weight"] = take(f"{src}attention.q_norm.weight")
            out[f"{dst}attn.k_norm.weight"] = take(f"{src}attention.k_norm.weight")
        out[f"{dst}ls1"], out[f"{dst}ls2"] = take(f"{src}lambda_1"), take(f"{src}lambda_2")
    if cfg.final_norm:
        for t in ("weight", "bias"):
            out[f"norm.{t}"] = take(f"layernorm.{t}")
    return out, used


MAPPERS = {"siglip": _siglip, "siglip2": _siglip2, "internvit": _internvit}


def read_tower(path) -> Tower:
    """The tower at `path` (a local Hugging Face model directory), or a one-line error saying why not."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MissingFileError(f"viq_train.init_vit_from: {path} is not a local model directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: invalid JSON ({e})") from None
    supported = ", ".join(TOWER_CLASSES)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "intern_vit_6b":
        raise ConfigError(f"{cfg_file}: model_type 'intern_vit_6b' is OpenGVLab's remote-code InternViT; use the "
                          "transformers conversion (the vision_tower of an InternVL '-hf' checkpoint, InternVLVisionModel)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{cfg_file}: not a transformers config ({str(e).splitlines()[0][:200]}); "
                          f"supported vision towers: {supported}") from None
    name = type(config).__name__
    if name == "InternVLConfig":
        raise ConfigError(f"{cfg_file}: a whole InternVL model; save its InternVLVisionModel alone "
                          "(InternVLForConditionalGeneration: model.model.vision_tower.save_pretrained(DIR)) and use that DIR")
    if name not in TOWER_CLASSES:
        raise ConfigError(f"{cfg_file}: {name} is not a supported vision tower; supported: {supported}")
    family, attr = TOWER_CLASSES[name]
    return Tower(path, name, family, attr, config.vision_config if attr else config)
