"""Finite Scalar Quantization (Mentzer et al., 2023, https://arxiv.org/abs/2309.15505).

Shapes: z [..., d] with d = len(levels); codes [..., d] in [-1, 1]; indices [...] int64.

Inputs are expected in [-1, 1] (the proximal representation arrives L-infinity
normalised and bounded). The usual bound `tanh(z + shift) * half_width` cannot reach every
level when |z| <= 1 (6 of 8 levels for L = 8) and its shift explodes for L = 2; here the
bound is an affine map of the clamped input onto [0, L - 1], so every level of every
dimension is reachable and L = 2 is ordinary.

Index = sum_i digit_i * prod(levels[:i]) (dimension 0 least significant). The codebook is
implicit: nothing of size prod(levels) is ever materialised except on request in chunks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    def __init__(self, levels: list[int] | tuple[int, ...]):
        super().__init__()
        levels = [int(l) for l in levels]
        if not levels or any(l < 2 for l in levels):
            raise ConfigError(f"FSQ levels must all be >= 2, got {levels}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        # Computed buffers are not checkpoint state.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    def _check_dim(self, x: torch.Tensor):
        if x.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects last dim {self.dim} (levels {self.levels}), got shape {tuple(x.shape)}")

    def digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        """Integer digits in [0, L-1] -> code values in [-1, 1] (fp32)."""
        half = (self._levels.float() - 1) / 2
        return digits.float() / half - 1

    def codes_to_digits(self, codes: torch.Tensor) -> torch.Tensor:
        half = (self._levels.float() - 1) / 2
        return ((codes.float() + 1) * half).round().long()

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [..., d] (ideally in [-1, 1]) -> (codes [..., d] fp32 with STE gradient, indices [...] int64)."""
        self._check_dim(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            half = (self._levels.float() - 1) / 2
            scaled = (z.clamp(-1.0, 1.0) + 1) * half  # [0, L-1]
            digits_ste = round_ste(scaled)
            codes = digits_ste / half - 1
            indices = (digits_ste.detach().round().long() * self._basis).sum(-1)
        return codes, indices

    def forward(self, z: torch.Tensor):
        return self.quantize(z)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_dim(codes)
        return (self.codes_to_digits(codes) * self._basis).sum(-1)

    def indices_to_digits(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.long()
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] -> codes [..., d] in [-1, 1] (fp32)."""
        return self.digits_to_codes(self.indices_to_digits(indices))

    def iter_codebook(self, chunk: int = 65536):
        """Yield (start, codes [n, d]) over the implicit codebook, chunk by chunk."""
        for start in range(0, self.codebook_size, chunk):
            idx = torch.arange(start, min(start + chunk, self.codebook_size), device=self._basis.device)
            yield start, self.indices_to_codes(idx)


@torch.no_grad()
def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage fraction and perplexity of the codes in `indices` (for logging)."""
    flat = indices.reshape(-1).long()
    if flat.numel() == 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
    counts = torch.bincount(flat, minlength=codebook_size).float()
    probs = counts / counts.sum()
    nz = probs[probs > 0]
    entropy = -(nz * nz.log()).sum()
    return {
        "codebook_usage": float((counts > 0).sum()) / codebook_size,
        "codebook_perplexity": float(entropy.exp()),
    }
