"""ViQ visual tokenizer: any-resolution ViT + position-aware multi-head FSQ -> discrete codes."""
from .fsq import FSQ, codebook_stats
from .image import ImageInputError, ResizePolicy, load_image, token_grid
from .model import VIQ_PRESETS, ViQConfig, ViQModel, get_preset

__all__ = [
    "FSQ", "codebook_stats", "ImageInputError", "ResizePolicy", "load_image", "token_grid",
    "VIQ_PRESETS", "ViQConfig", "ViQModel", "get_preset",
]
