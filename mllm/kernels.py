"""Kernels from maintained packages, swapped in by composition (config keys `model.kernels`,
`model.fp8`); GPU-only opt-ins, measured by `bench_throughput.py --sweep-levers` variants.

- `model.kernels: liger`: each decoder layer's two RMSNorms and the final norm become
  liger-kernel's `LigerRMSNorm` (Triton, "llama" casting: fp32 statistics, weight applied in the
  input dtype, as Qwen2RMSNorm does) and each SwiGLU MLP becomes `LigerSwiGLUMLP` (one fused
  SiLU-multiply kernel); the weights are moved over, so the model computes the same function.
  Modules are replaced on the instance, transformers' classes are never patched, so liger's RoPE
  (a function transformers' attention looks up by name) is not used.
- `model.fp8: true`: torchao's float8 training for the decoder layers' linear layers (Hopper:
  H100/H200), dynamic scaling; the embedding, the merger and the head stay bf16. MFU stays
  counted against the bf16 peak.

Under ZeRO-3 the parameters are partitioned while the model is built, so both are refused there.
"""
from __future__ import annotations

import importlib.util

import torch

from viq.config import ConfigError

KERNEL_SETS = ("none", "liger")


def apply_kernel_options(model, model_cfg, zero_stage: int) -> list[str]:
    """Apply `model.kernels` / `model.fp8` to a ViQMLLM; returns what was replaced, for the log."""
    done: list[str] = []
    if model_cfg.kernels == "none" and not model_cfg.fp8:
        return done
    if zero_stage == 3:
        raise ConfigError("config keys 'model.kernels' / 'model.fp8' replace modules after construction, which "
                          "ZeRO-3's partitioned parameters do not allow; use trainer.zero_stage 0-2")
    if model_cfg.kernels == "liger":
        done.append(f"liger-kernel: {_swap_liger(model.llm)} modules")
    if model_cfg.fp8:
        if model_cfg.lora.enabled:
            raise ConfigError("config key 'model.fp8' with model.lora: LoRA's adapters wrap the same linear layers; choose one")
        done.append(f"torchao float8: {_convert_fp8(model.llm.model.layers)} linear layers")
    return done


def _require(package: str, key: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"config key '{key}' needs the '{package}' package ({why}); pip install -e .[gpu]")


def _swap_liger(llm) -> int:
    _require("liger_kernel", "model.kernels", "Triton kernels, CUDA only")
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    cfg = llm.config
    if cfg.hidden_act != "silu":
        raise ConfigError(f"config key 'model.kernels': liger's SwiGLU needs hidden_act silu, the LLM has {cfg.hidden_act}")

    def norm(old):
        new = LigerRMSNorm(old.weight.shape[0], eps=old.variance_epsilon, casting_mode="llama")
        new.weight = old.weight  # the same Parameter: optimizer groups and ties see no change
        return new

    n = 0
    for layer in llm.model.layers:
        layer.input_layernorm = norm(layer.input_layernorm)
        layer.post_attention_layernorm = norm(layer.post_attention_layernorm)
        with torch.device("meta"):  # its own Linear modules are replaced by the model's below
            mlp = LigerSwiGLUMLP(cfg)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, getattr(layer.mlp, name))  # the trained Linear modules themselves
        layer.mlp = mlp
        n += 3
    llm.model.norm = norm(llm.model.norm)
    return n + 1


def _convert_fp8(layers) -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("config key 'model.fp8' needs a GPU with float8 tensor cores (H100/H200, compute capability >= 8.9)")
    _require("torchao", "model.fp8", "float8 training")
    from torchao.float8 import convert_to_float8_training

    converted = []

    def eligible(module, fqn: str) -> bool:  # float8 matmuls need both dimensions divisible by 16
        ok = isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(layers, module_filter_fn=eligible)
    return len(converted)
