"""Which AdamW implementation takes the optimizer step (config key `optim.implementation`).

The update is the same AdamW in every case; what differs is how many kernels and host round
trips the step costs, which on one GPU was a quarter of the 0.5B cached-code step
(docs/benchmarks.md):

- `config`: the DeepSpeed JSON's "optimizer" block as written (configs/deepspeed/*.json:
  torch.optim.AdamW built by DeepSpeed, torch's default kernel choice: foreach on CUDA,
  a Python loop over parameters on CPU);
- `torch_foreach` / `torch_fused`: torch.optim.AdamW with `foreach=True` / `fused=True`,
  handed to deepspeed.initialize as the client optimizer (the JSON's block is dropped);
  ZeRO-1/2 and the bf16 wrapper still own the fp32 master weights and call its step();
- `deepspeed_fused`: the JSON's block with `torch_adam: false`, i.e. DeepSpeed's own FusedAdam
  (a CUDA extension DeepSpeed builds on first use; needs nvcc where DS_BUILD_OPS=0).

ZeRO-Offload keeps its optimizer on the CPU (DeepSpeedCPUAdam): a client optimizer there is
refused by DeepSpeed, so it is refused here first, with the key to change.
"""
from __future__ import annotations

import torch

from viq.config import ConfigError

OPTIMIZER_IMPLEMENTATIONS = ("config", "torch_foreach", "torch_fused", "deepspeed_fused")


def _offloads_optimizer(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def configure_optimizer(groups: list[dict], optim_cfg, ds_config: dict, device: torch.device):
    """(client optimizer or None, the DeepSpeed config to initialise with) for `optim.implementation`.

    `groups`: the trainer's parameter groups (lr / weight_decay per group). The returned config
    is a copy; the caller's is left as it was."""
    impl = optim_cfg.implementation
    if impl not in OPTIMIZER_IMPLEMENTATIONS:
        raise ConfigError(f"config key 'optim.implementation' is '{impl}'; valid values: {', '.join(OPTIMIZER_IMPLEMENTATIONS)}")
    ds = {**ds_config}
    if impl == "config":
        return None, ds
    if impl == "deepspeed_fused":
        if device.type != "cuda":
            raise ConfigError("config key 'optim.implementation': deepspeed_fused is DeepSpeed's CUDA FusedAdam; "
                              "on CPU use config, torch_foreach or torch_fused")
        block = ds.get("optimizer") or {"type": "AdamW", "params": {}}
        ds["optimizer"] = {**block, "params": {**block.get("params", {}), "torch_adam": False}}
        return None, ds
    if _offloads_optimizer(ds):
        raise ConfigError(f"config key 'optim.implementation' is '{impl}', but the DeepSpeed config offloads the "
                          "optimizer to the CPU (DeepSpeedCPUAdam); use optim.implementation=config there")
    params = (ds.pop("optimizer", None) or {}).get("params", {})
    kind = {"torch_foreach": {"foreach": True}, "torch_fused": {"fused": True}}[impl]
    optimizer = torch.optim.AdamW(
        groups, lr=params.get("lr", optim_cfg.lr), betas=tuple(params.get("betas", optim_cfg.betas)),
        eps=params.get("eps", optim_cfg.eps), weight_decay=params.get("weight_decay", optim_cfg.weight_decay), **kind,
    )
    return optimizer, ds
