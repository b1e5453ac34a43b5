"""Reconstruction quality of a ViQ tokenizer with a decoder: PSNR, SSIM and rFID.

    metrics.py     PSNR / SSIM / Frechet distance and ReconstructionError
    inception.py   the FID network (TF-Inception-v3 as torch-fidelity's inception-v3-compat), local weights
    evaluate.py    the protocol behind scripts/eval_reconstruction.py (ADM crops -> codes -> pixels)
"""
from eval.reconstruction.evaluate import (
    IMAGE_EXTENSIONS,
    center_crop_adm,
    evaluate_reconstruction,
    list_images,
    save_comparison_grid,
)
from eval.reconstruction.inception import (
    FID_FEATURE_DIM,
    INCEPTION_SIZE,
    InceptionFeatures,
    default_fid_weights,
    load_inception_weights,
    map_torchscript_inception,
    resize_like_tf1,
    tf1_bilinear_matrix,
    torchscript_layer_names,
)
from eval.reconstruction.metrics import (
    PSNR_CAP_DB,
    ReconstructionError,
    frechet_distance,
    mean_psnr,
    mean_ssim,
    psnr,
    ssim,
    to_unit_float64,
)

__all__ = [
    "FID_FEATURE_DIM", "IMAGE_EXTENSIONS", "INCEPTION_SIZE", "PSNR_CAP_DB", "InceptionFeatures", "ReconstructionError",
    "center_crop_adm", "default_fid_weights", "evaluate_reconstruction", "frechet_distance", "list_images",
    "load_inception_weights", "map_torchscript_inception", "mean_psnr", "mean_ssim", "psnr", "resize_like_tf1",
    "save_comparison_grid", "ssim", "tf1_bilinear_matrix", "to_unit_float64", "torchscript_layer_names",
]
