"""Continuous vision encoders + projectors: the baseline that cached codes are compared with.

Every arm is built from transformers' own classes with the released towers' configs (random
init: speed needs no weights), so the attention and MLP kernels, normalisation and position
handling are the ones a LLaVA-OneVision or InternVL user runs:

- `internvit-300m`: `InternVLVisionModel` with InternViT-300M-448px's config (width 1024, depth
  24, 16 heads, MLP 4096, patch 14, class token, q/k/v bias, layer scale, no final norm); its
  patch features pixel-shuffled 2x2 -> 256 positions per 448 px image; InternVL's projector
  (`InternVLMultiModalProjector`: LayerNorm -> Linear -> GELU -> Linear).
- `siglip-so400m`: `SiglipVisionModel` with SigLIP-so400m-patch14-384's config (width 1152,
  depth 27, 16 heads, MLP 4304, no pooling head); its post-LayerNorm features on the same
  448 px images (position grid resized bicubically, as transformers does), merged 2x2 and
  projected as InternVL does, so that it hands the LLM exactly the positions every other arm
  does: the comparison measures the encoder alone.
- `siglip-so400m-llava-ov`: SigLIP as LLaVA-OneVision runs it: 26 blocks, the last block's
  features without the post-LayerNorm, one 384 px crop per image -> 27 x 27 = 729 positions,
  no merge, `LlavaOnevisionMultiModalProjector` (Linear -> GELU -> Linear). The LLM sees 729
  positions per image instead of 256, so this arm's step includes the LLM's extra work, as
  LLaVA-OneVision's does (its anyres tiling adds further 729-position crops for larger
  images: this is the cost of one crop).

Patches are merged in 2x2 blocks, row-major over the merged grid: the same order as the
`image_pad` rows of the ViQ image layout (InternVL's pixel shuffle concatenates the four
channels in another order, which costs the same).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderSpec:
    family: str  # siglip | internvit
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int = 14
    native_size: int = 448  # the tower's image_size (its position grid)
    merge: int = 2  # m x m patches -> one LLM position (pixel shuffle); 1: every patch is a position
    crop_size: int = 0  # > 0: every image enters as one crop of this side (LLaVA-OV); 0: the benchmark's size
    post_norm: bool = True  # SigLIP: the post-LayerNorm features; False: the last block's (LLaVA-OV)

    def image_side(self, image_size: int) -> int:
        return self.crop_size or image_size

    def grid(self, image_size: int) -> int:
        """LLM positions per image side."""
        return self.image_side(image_size) // self.patch_size // self.merge


_SIGLIP_SO400M = dict(width=1152, heads=16, mlp_dim=4304, native_size=384)
_SIGLIP_TINY = dict(width=72, heads=4, mlp_dim=272, native_size=112)
CONTINUOUS_ENCODERS: dict[str, EncoderSpec] = {
    "internvit-300m": EncoderSpec("internvit", 1024, 24, 16, 4096, native_size=448),
    "siglip-so400m": EncoderSpec("siglip", depth=27, **_SIGLIP_SO400M),
    "siglip-so400m-llava-ov": EncoderSpec("siglip", depth=26, merge=1, crop_size=384, post_norm=False, **_SIGLIP_SO400M),
    # CPU-sized versions of the three, for tests and the tiny benchmark mode
    "internvit-tiny": EncoderSpec("internvit", 64, 2, 4, 256, native_size=112),
    "siglip-tiny": EncoderSpec("siglip", depth=3, **_SIGLIP_TINY),
    "siglip-tiny-llava-ov": EncoderSpec("siglip", depth=2, merge=1, crop_size=112, post_norm=False, **_SIGLIP_TINY),
}


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in CONTINUOUS_ENCODERS:
        raise ValueError(f"unknown continuous encoder {name!r}; valid: {', '.join(CONTINUOUS_ENCODERS)}")
    return CONTINUOUS_ENCODERS[name]


def tower_config(spec: EncoderSpec):
    """The transformers config of the released tower the spec describes."""
    if spec.family == "siglip":
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(hidden_size=spec.width, intermediate_size=spec.mlp_dim, num_hidden_layers=spec.depth,
                                  num_attention_heads=spec.heads, patch_size=spec.patch_size, image_size=spec.native_size,
                                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(hidden_size=spec.width, intermediate_size=spec.mlp_dim, num_hidden_layers=spec.depth,
                                num_attention_heads=spec.heads, patch_size=spec.patch_size, image_size=spec.native_size,
                                hidden_act="gelu", attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                                layer_scale_init_value=0.1, use_mean_pooling=True)


class ContinuousEncoder(nn.Module):
    """transformers' tower: [N, 3, S, S] images -> [N * positions, width * merge^2] features."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        from transformers import AutoModel

        self.spec = spec
        self.tower = AutoModel.from_config(tower_config(spec), attn_implementation="sdpa")

    @property
    def out_dim(self) -> int:
        return self.spec.width * self.spec.merge**2

    def tokens_per_image(self, image_size: int) -> int:
        return self.spec.grid(image_size) ** 2

    def gradient_checkpointing_enable(self) -> None:
        # a trained encoder's activations would dwarf the LLM's otherwise
        self.tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        side = pixels.shape[-1]
        step = spec.patch_size * spec.merge
        if pixels.shape[-2] != side or (spec.crop_size and side != spec.crop_size) or (not spec.crop_size and side % step):
            want = f"{spec.crop_size} px crops" if spec.crop_size else f"square images with a side divisible by {step}"
            raise ValueError(f"{spec.family} encoder takes {want}; got {tuple(pixels.shape[-2:])}")
        x = pixels.to(next(self.tower.parameters()).dtype)
        if spec.family == "siglip":
            out = self.tower(pixel_values=x, interpolate_pos_encoding=side != spec.native_size,
                             output_hidden_states=not spec.post_norm)
            features = out.last_hidden_state if spec.post_norm else out.hidden_states[-1]
        else:
            features = self.tower(pixel_values=x).last_hidden_state[:, 1:]  # the class token is not a position
        return merge_patches(features, side // spec.patch_size, spec.merge)


def build_projector(spec: EncoderSpec, llm_hidden: int) -> nn.Module:
    """The projector of the stack the arm stands for, as transformers builds it."""
    text = {"model_type": "qwen2", "hidden_size": llm_hidden}
    if spec.merge == 1:
        from transformers import LlavaOnevisionConfig
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

        return LlavaOnevisionMultiModalProjector(LlavaOnevisionConfig(vision_config=tower_config(spec).to_dict(),
                                                                      text_config=text))
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    return InternVLMultiModalProjector(InternVLConfig(vision_config={"hidden_size": spec.width}, text_config=text,
                                                      downsample_ratio=1 / spec.merge))


def merge_patches(x: torch.Tensor, grid: int, m: int) -> torch.Tensor:
    """[N, grid*grid, D] row-major patches -> [N * (grid/m)^2, m*m*D]: each m x m block concatenated
    (top-left, top-right, ..., row by row), blocks row-major."""
    n, _, d = x.shape
    g = grid // m
    x = x.reshape(n, g, m, g, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * g * g, m * m * d)


def encoder_forward_flops(spec: EncoderSpec, image_size: int, n_images: int, llm_hidden: int) -> float:
    """Matmul FLOPs of one forward pass over n_images square images, projector included."""
    d, p = spec.width, spec.patch_size
    patches = (spec.image_side(image_size) // p) ** 2
    t = patches + (1 if spec.family == "internvit" else 0)  # InternViT's class token
    per_block = 2 * t * (4 * d * d + 2 * d * spec.mlp_dim) + 4 * t * t * d
    patch = 2 * patches * 3 * p * p * d
    positions = spec.grid(image_size) ** 2
    projector = 2 * positions * (spec.merge**2 * d * llm_hidden + llm_hidden * llm_hidden)
    return float(n_images * (spec.depth * per_block + patch + projector))
