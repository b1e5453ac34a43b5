"""SimVQ: vector quantisation through a learnable linear map of a frozen codebook.

Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer", 2024, https://arxiv.org/abs/2411.02038. The codebook is C = E W^T with E [K, d] frozen
(random, saved with the weights) and W [d, d] learned: every step moves the whole codebook
through W, so no code is left behind (the collapse of plain VQ). The ViQ paper's Table 4
compares it with FSQ; here it is the `quant.kind: simvq` ablation of ProximalQuantizer.

Shapes: z [..., d]; codes [..., d] (straight-through: the forward value is C[index], the
gradient reaches z); indices [...] int64; commitment loss a scalar.

Size: unlike FSQ's implicit codebook, E is held: K x d fp32 (64,000 x 8 is 2 MB). Distances
are computed for `chunk` queries at a time, so the largest temporary is chunk x K floats
(4,096 x 64,000 is 1 GiB) however many sub-codes an image has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class SimVQ(nn.Module):
    def __init__(self, codebook_size: int, dim: int, *, commit_beta: float = 0.25, chunk: int = 4096):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ConfigError(f"SimVQ needs codebook_size >= 2 and dim >= 1, got {codebook_size} x {dim}")
        self.codebook_size, self.dim, self.commit_beta, self.chunk = codebook_size, dim, commit_beta, chunk
        # Frozen but persistent: the codes mean nothing without the exact E they index.
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.proj.weight)

    def codebook(self) -> torch.Tensor:
        """The effective codebook C = E W^T [K, d] in fp32."""
        with torch.autocast(device_type=self.frozen_codebook.device.type, enabled=False):
            return F.linear(self.frozen_codebook.float(), self.proj.weight.float())

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of z [n, d] (fp32), chunk by chunk."""
        sq = codebook.square().sum(-1)
        out = [(sq[None] - 2 * part @ codebook.T).argmin(-1) for part in z.split(self.chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [..., d] -> (codes [..., d] with straight-through gradient, indices [...], commitment loss)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"SimVQ expects last dim {self.dim}, got shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().reshape(-1, self.dim)
            codebook = self.codebook()
            indices = self.nearest(flat, codebook)
            q = codebook[indices]
            # The codebook (through W) moves to the encoder output; the encoder commits to it (beta).
            commit = F.mse_loss(q, flat.detach()) + self.commit_beta * F.mse_loss(flat, q.detach())
            codes = flat + (q - flat).detach()
        lead = z.shape[:-1]
        return codes.reshape(*lead, self.dim), indices.reshape(lead), commit

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] -> codebook rows [..., d] (fp32)."""
        return self.codebook()[indices.long()]

    def iter_codebook(self, chunk: int = 65536):
        """Yield (start, codes [n, d]) over the codebook, chunk by chunk (as FSQ.iter_codebook)."""
        codebook = self.codebook()
        for start in range(0, self.codebook_size, chunk):
            yield start, codebook[start:start + chunk]
