"""The `--dtype` / `--device` spellings every command accepts, resolved in one place."""
from __future__ import annotations

import torch

from viq.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """"bf16" / "float32" / ... -> torch dtype; None: bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]
