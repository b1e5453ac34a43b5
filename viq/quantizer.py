"""Proximal quantiser: bottleneck, L-infinity normalisation, 2x2 multi-head expansion, FSQ.

ViQ paper, stage 2 ("proximal representation"): feature f in R^C -> bottleneck f1 in R^D
-> f1 / ||f1||_inf (onto the hypercube surface) -> down-projection to d (d << D << C) ->
multi-head attention that expands each token into its 2x2 sub-codes (N -> 4N) with 2D
RoPE at the sub-positions injected before quantisation -> FSQ -> merged back to N tokens.

Sub-code s of the token at (r, c) sits at (2r + s // 2, 2c + s % 2); keys sit at the token
centres (2r + 0.5, 2c + 0.5). Queries of an image attend only to that image's tokens.

Shapes: tokens [N, C]; cu_seqlens [n+1] over tokens; indices [N, 4]; quantised [N, F].

Ablation switches (`QuantConfig`, the ViQ paper's Table 4; defaults are the method above):
`proximal: false` drops the bottleneck and the L-infinity normalisation (FSQ on a
down-projection of the features), `rope: false` drops the 2D RoPE of the 2x2 expansion (the
sub-code queries then differ only by their learned embeddings), `kind: simvq` replaces FSQ by
a SimVQ codebook (viq/simvq.py) whose commitment loss the forward returns as `commit_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import varlen_attention
from .errors import ConfigError
from .fsq import FSQ
from .ranges import at_least
from .rope import apply_rope, rope_2d_angles
from .simvq import SimVQ

SUBCODES = 4
QUANTIZER_KINDS = ("fsq", "simvq")


@dataclass
class QuantConfig:
    """The quantiser's design switches (ablations); the defaults are the ViQ paper's method."""

    kind: str = "fsq"  # fsq | simvq: a learned-projection codebook with commitment losses
    proximal: bool = True  # false: no bottleneck / L-infinity; FSQ (or SimVQ) on a down-projection of the features
    rope: bool = True  # false: no 2D RoPE at the sub-code positions before quantisation
    simvq_codebook_size: int = 0  # 0: prod(levels), the same vocabulary as FSQ's
    simvq_dim: int = 8  # width of a SimVQ code vector
    commit_beta: float = 0.25  # SimVQ: weight of the encoder's commitment term
    commit_weight: float = 1.0  # SimVQ: weight of the commitment loss in tokenizer training

    RANGES: ClassVar[dict] = {"simvq_codebook_size": at_least(0), "simvq_dim": at_least(1), "commit_beta": at_least(0),
                              "commit_weight": at_least(0)}

    def __post_init__(self):
        if self.kind not in QUANTIZER_KINDS:
            raise ConfigError(f"viq.quant.kind is '{self.kind}'; valid values: {', '.join(QUANTIZER_KINDS)}")
        # negative sizes are range errors (RANGES, reported with every other bad value at load);
        # a one-code book is the one value a range cannot exclude
        if self.simvq_codebook_size == 1:
            raise ConfigError("viq.quant.simvq_codebook_size must be 0 (prod(levels)) or >= 2, got 1")


def linf_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Project each vector onto the surface of the unit L-infinity ball: max |x_i| = 1."""
    return x / x.abs().amax(dim=-1, keepdim=True).clamp_min(eps)


def token_positions(grids, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = [], []
    for h, w in grids:
        rows.append(torch.arange(h, device=device).repeat_interleave(w))
        cols.append(torch.arange(w, device=device).repeat(h))
    return torch.cat(rows), torch.cat(cols)


class ProximalQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.quant_dim
        if d % cfg.quant_heads or (d // cfg.quant_heads) % 4:
            raise ValueError(f"quant_dim {d} / quant_heads {cfg.quant_heads} must give a head dim divisible by 4")
        self.heads = cfg.quant_heads
        self.switches = cfg.quant
        # No bias: a trainable shared offset before the L-infinity normalisation would push every
        # token to the same hypercube corner. The input is centred by a fixed buffer instead.
        if self.switches.proximal:
            self.bottleneck = nn.Linear(cfg.width, cfg.bottleneck_dim, bias=False)
        self.register_buffer("token_mean", torch.zeros(cfg.width))
        self.down = nn.Linear(cfg.bottleneck_dim if self.switches.proximal else cfg.width, d)
        self.subcode_embed = nn.Parameter(torch.randn(SUBCODES, d) * 0.02)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        # LayerNorm + unit-variance projection: at init the pre-tanh values have std ~1, so
        # FSQ sees spread inputs and the codebook is used from the first step.
        self.pre_fsq_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        code_dim = len(cfg.levels) if self.switches.kind == "fsq" else self.switches.simvq_dim
        self.pre_fsq = nn.Linear(d, code_dim)
        nn.init.normal_(self.pre_fsq.weight, std=d**-0.5)
        nn.init.zeros_(self.pre_fsq.bias)
        if self.switches.kind == "fsq":
            self.fsq = FSQ(cfg.levels)
        else:
            self.simvq = SimVQ(cfg.codebook_size, code_dim, commit_beta=self.switches.commit_beta)
        # Quantised sub-codes -> one feature per token (also used by embed_codes).
        self.post_fsq = nn.Linear(code_dim, d)
        self.merge = nn.Linear(SUBCODES * d, cfg.feature_dim)

    @torch.no_grad()
    def center_bottleneck(self, mean_token: torch.Tensor) -> None:
        """Data-dependent init: subtract the mean input token before the bottleneck.

        Text-aligned ViT features share a large common component (stage 1 gives a mean-vector
        norm ~15x the per-token deviation); after L-infinity normalisation every token would
        then sit at nearly the same corner and FSQ would use a handful of codes.
        """
        self.token_mean.copy_(mean_token.to(self.token_mean))

    def expand(self, g: torch.Tensor, grids, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """g [N, d] -> sub-code features [N, 4, d] through per-image multi-head attention."""
        n, d = g.shape
        rows, cols = token_positions(grids, g.device)
        query_in = g[:, None, :] + self.subcode_embed[None].to(g.dtype)  # [N, 4, d]
        sub = torch.arange(SUBCODES, device=g.device)
        q_rows = (2 * rows[:, None] + sub[None] // 2).reshape(-1)
        q_cols = (2 * cols[:, None] + sub[None] % 2).reshape(-1)
        head_dim = d // self.heads
        q_angles = rope_2d_angles(q_rows, q_cols, head_dim, self.cfg.rope_theta)
        k_angles = rope_2d_angles(2 * rows + 0.5, 2 * cols + 0.5, head_dim, self.cfg.rope_theta)
        q = rearrange(self.q(query_in), "n s (h e) -> (n s) h e", h=self.heads)
        k = rearrange(self.k(g), "n (h e) -> n h e", h=self.heads)
        if self.switches.rope:
            q, k = apply_rope(q, q_angles), apply_rope(k, k_angles)
        v = rearrange(self.v(g), "n (h e) -> n h e", h=self.heads)
        out = varlen_attention(q, k, v, cu_seqlens * SUBCODES, backend=self.cfg.attn_backend, cu_seqlens_k=cu_seqlens)
        x = query_in + rearrange(self.o(rearrange(out, "t h e -> t (h e)")), "(n s) d -> n s d", s=SUBCODES)
        return x + self.mlp(self.norm(x))

    def project_to_fsq(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 so that rounding decisions do not depend on the compute dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(
                x.float(), (x.shape[-1],), self.pre_fsq_norm.weight.float(), self.pre_fsq_norm.bias.float(),
                self.pre_fsq_norm.eps,
            )
            z = F.linear(x, self.pre_fsq.weight.float(), self.pre_fsq.bias.float())
            # FSQ needs a bounded input; SimVQ's nearest-neighbour search does not.
            return torch.tanh(z) if self.switches.kind == "fsq" else z

    def codes_to_features(self, codes: torch.Tensor) -> torch.Tensor:
        """FSQ code values [N, 4, L] -> quantised token features [N, F]."""
        dtype = self.post_fsq.weight.dtype
        sub = self.post_fsq(codes.to(dtype))
        return self.merge(rearrange(sub, "n s d -> n (s d)"))

    def forward(self, tokens: torch.Tensor, grids, cu_seqlens: torch.Tensor) -> dict:
        momentum = self.cfg.center_momentum
        if self.training and momentum > 0:  # the ViT is training too: keep the centre current
            with torch.no_grad():
                self.token_mean.lerp_(tokens.detach().float().mean(0).to(self.token_mean), 1 - momentum)
        centred = tokens - self.token_mean.to(tokens.dtype)
        f1 = linf_normalize(self.bottleneck(centred)) if self.switches.proximal else None
        g = self.down(centred if f1 is None else f1)
        expanded = self.expand(g, grids, cu_seqlens)
        out = {"bottleneck": f1}  # None without the proximal representation
        if self.switches.kind == "fsq":
            codes, indices = self.fsq.quantize(self.project_to_fsq(expanded))
        else:
            codes, indices, out["commit_loss"] = self.simvq.quantize(self.project_to_fsq(expanded))
        out.update(codes=codes, indices=indices, quantized=self.codes_to_features(codes))  # [N, 4, L], [N, 4], [N, F]
        return out

    @property
    def code_quantizer(self) -> FSQ | SimVQ:
        """The module that turns vectors into indices: FSQ (implicit codebook) or SimVQ (held codebook)."""
        return self.fsq if self.switches.kind == "fsq" else self.simvq

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [..., 4] -> quantised features [..., F] (the decoder side of the codes)."""
        lead = indices.shape[:-1]
        codes = self.code_quantizer.indices_to_codes(indices.reshape(-1, SUBCODES).to(self.post_fsq.weight.device))
        return self.codes_to_features(codes).reshape(*lead, -1)
