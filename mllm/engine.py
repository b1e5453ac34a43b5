"""Everything DeepSpeed: distributed set-up, the engine, ZeRO gathering, freezing, groups.

Model code (viq/, mllm/model.py) is plain single-device PyTorch and never imports
deepspeed; this module applies parallelism and activation checkpointing from outside.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from pathlib import Path

import torch

from mllm.optimizers import configure_optimizer
from viq.config import ConfigError

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- distributed -------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); works under the deepspeed launcher or as a lone process."""
    import deepspeed

    if "RANK" not in os.environ:  # run as plain `python`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        # DeepSpeed JIT-compiles a shared-memory all-reduce kernel for CPU ranks on first use: a
        # minute of compiling on a small machine, and a compile killed half-way leaves a lock file
        # in ~/.cache/torch_extensions that makes every later launch wait forever. Gloo alone
        # carries the CPU runs, so the kernel is switched off (its table is the documented switch).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a lone process's rendezvous, or a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_and_dtype(dtype_name: str) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    else:
        device = torch.device("cpu")
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    return device, dtype


def _multi_rank() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """Sum of a host number over ranks; on a single rank no device round trip (no sync)."""
    if not _multi_rank():
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def all_reduce_vector(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a device tensor (in place); unchanged on a single rank."""
    if _multi_rank():
        torch.distributed.all_reduce(t)
    return t


def any_rank_nonfinite(value: torch.Tensor) -> bool:
    """True when `value` is inf/nan on any rank (one all-reduce and one read)."""
    return bool(all_reduce_vector((~torch.isfinite(value.detach())).to(torch.float64).reshape(1)).item())


def gathered(stage: int):
    """Context-manager factory for reading/writing full parameters (ZeRO-3 shards them)."""
    if stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters

    @contextlib.contextmanager
    def nothing(params, modifier_rank=None):
        yield

    return nothing


def full_numel(p: torch.Tensor) -> int:
    """Element count of a parameter, also while ZeRO-3 holds only its shard (`numel()` is 0 then)."""
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def _zero3_construction(ds_config: dict):
    # transformers keeps only a weak reference to HfDeepSpeedConfig: this frame holds it while
    # the model is built, so from_pretrained / _from_config / resize_token_embeddings see ZeRO-3.
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    try:
        # No dtype argument: with one, deepspeed 0.19.8's Init picks bf16 on CPU (an operator-precedence
        # slip in Init._set_dtype); the config's bf16 flag gives the training dtype.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield hf_ds_config
    finally:
        unset_hf_deepspeed_config()


def construction_context(ds_config: dict):
    """Where the model is built: under ZeRO-3, partitioned from the start so that no rank ever
    holds the whole model; otherwise a plain context.

    ZeRO-3: `deepspeed.zero.Init` partitions each module's parameters as soon as the module is
    made (every rank gets rank 0's values), and transformers' ZeRO-3 path (HfDeepSpeedConfig)
    initialises a preset's weights module by module on rank 0 under gathered parameters, or
    loads a checkpoint's tensors into the shards module by module (rank 0 reads, the others
    take their shard). Inside, shapes of partitioned parameters are 0: code that reads or
    writes whole matrices enters `gathered(stage)` around it.
    """
    if ds_config["zero_optimization"]["stage"] == 3:
        return _zero3_construction(ds_config)
    return contextlib.nullcontext()


def master_weights(engine) -> list[torch.Tensor]:
    """The tensors this rank's optimizer updates: DeepSpeed's fp32 master partitions under ZeRO
    (whole parameters without it). ZeRO-3 empties the inner optimizer's param groups between
    steps (it puts one partition back for the duration of its step), so its partitions are read
    from the ZeRO-3 optimizer itself."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = {id(p): p for group in inner.param_groups for p in group["params"]}
    masters.update((id(p), p) for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    return list(masters.values())


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes DeepSpeed holds for the model on this rank between steps: "parameters" (the local
    shard under ZeRO-3, whole parameters otherwise) and "optimizer" (the fp32 master partition
    and Adam's moments). Each storage is counted once, so flat buffers are not double-counted."""
    seen: dict[int, tuple[str, int]] = {}

    def add(kind: str, t) -> None:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = (kind, storage.nbytes())

    for p in engine.module.parameters():
        add("parameters", p.data)
        add("parameters", getattr(p, "ds_tensor", None))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for p in master_weights(engine) + list(inner.state):
        add("optimizer", p.data)
        for value in inner.state.get(p, {}).values():
            add("optimizer", value)
    out = {"parameters": 0, "optimizer": 0}
    for kind, nbytes in seen.values():
        out[kind] += nbytes
    return out


# ---- DeepSpeed config ---------------------------------------------------------------------
def load_ds_config(cfg, use_bf16: bool) -> dict:
    """Read the ZeRO JSON (trainer.deepspeed_config or configs/deepspeed/zero<stage>.json) and
    fill its "auto" values from the training config; explicit values in the file win."""
    path = cfg.trainer.deepspeed_config or str(REPO_ROOT / "configs" / "deepspeed" / f"zero{cfg.trainer.zero_stage}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path} (trainer.deepspeed_config / trainer.zero_stage)")
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    o = cfg.optim
    fill = {
        "gradient_accumulation_steps": cfg.trainer.grad_accum,
        "gradient_clipping": o.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    # Trainer.train_step calls engine.step() once per optimizer step, after the step's last
    # backward: the boundary is the trainer's, so a skipped micro-batch cannot shift it.
    ds.setdefault("managed_gradient_accumulation", False)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x ranks
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = use_bf16
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    for key, value in {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    params.setdefault("torch_adam", True)  # DeepSpeed's fused Adam needs compiled ops
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", cfg.trainer.zero_stage)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no value for 'auto' key(s) {', '.join(leftover)}")
    return ds


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---- freezing and parameter groups ----------------------------------------------------------
def apply_freezing(model, cfg) -> dict:
    """Apply config.freeze; returns the report that is logged. Decoder layers / final norm can
    be frozen outright. Text rows: with split tables (model.split_code_rows) the text_rows
    Parameters are frozen outright; otherwise they share a tensor with the code rows, so their
    freezing is a gradient mask (rows below code_base get zero gradient)."""
    code_base = model.vocab.code_base
    frozen = []
    if cfg.freeze.llm_body:
        for name, p in model.llm.model.named_parameters():
            if not name.startswith("embed_tokens"):
                p.requires_grad_(False)
                frozen.append(f"llm.model.{name}")
    masked = []
    if cfg.freeze.text_embeddings and model.code_rows_split:
        for name, p in model.llm.named_parameters():  # a tied head's tables appear once, as the embedding's
            if name.endswith(".text_rows"):
                p.requires_grad_(False)
                frozen.append(f"llm.{name}")
    elif cfg.freeze.text_embeddings:
        if cfg.optim.weight_decay:
            raise ConfigError("freeze.text_embeddings needs optim.weight_decay=0 (decay would still move the frozen rows)")
        tables = {id(model.llm.get_input_embeddings().weight): model.llm.get_input_embeddings().weight}
        head = model.llm.get_output_embeddings()
        if head is not None:
            tables[id(head.weight)] = head.weight
        for weight in tables.values():
            weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:code_base]), g[code_base:]]) if g.shape[0] else g)
            masked.append(f"{tuple(weight.shape)} rows [0, {code_base})")
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    return {"frozen_params": frozen, "masked_embedding_rows": masked, "trainable": trainable, "total": total}


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name or "embed" in name or "lm_head" in name


def build_param_groups(model, cfg) -> list[dict]:
    """Decay / no-decay groups, plus, when optim.code_embedding_lr > 0, a "code" group (that LR,
    no weight decay) of the code merger and the code_rows tables of the split embedding / untied
    head (model.split_code_rows). Asserts every trainable parameter is in exactly one group."""
    o = cfg.optim
    if o.code_embedding_lr > 0 and not model.code_rows_split:
        raise ConfigError(
            "optim.code_embedding_lr > 0 needs the code rows in their own tensors: call model.split_code_rows() first"
        )
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if o.code_embedding_lr > 0 and (name.startswith("merger.") or name.endswith(".code_rows")):
            key, lr, wd = "code", o.code_embedding_lr, 0.0
        elif _no_decay(name, p):
            key, lr, wd = "no_decay", o.lr, 0.0
        else:
            key, lr, wd = "decay", o.lr, o.weight_decay
        g = groups.setdefault(key, {"params": [], "names": [], "lr": lr, "weight_decay": wd, "name": key})
        g["params"].append(p)
        g["names"].append(name)
    seen = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(seen) == len(set(seen)) and set(seen) == set(trainable), "optimizer groups must cover each trainable parameter once"
    return [
        {"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": g["name"]}
        for g in groups.values()
    ], {k: len(g["names"]) for k, g in groups.items()}


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine down to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compile_options(mode: str) -> dict:
    """torch.compile keyword arguments of `model.compile_mode` ("default" passes none)."""
    return {} if mode == "default" else {"mode": mode}


def initialize_engine(model, cfg, use_bf16: bool, ds_config: dict | None = None):
    """deepspeed.initialize with our groups and schedule; returns (engine, ds_config, group sizes).

    `ds_config`: the one the model was built for (load_ds_config), read again when omitted."""
    import deepspeed

    ds_config = ds_config or load_ds_config(cfg, use_bf16)
    if cfg.model.gradient_checkpointing:
        n = model.gradient_checkpointing_enable(fraction=cfg.model.checkpoint_fraction)
        log.info("activation checkpointing: %d of the %s layers", n, model.decoder_layer_class.__name__)
    if cfg.model.compile_layers:
        n = model.compile_decoder_layers(**compile_options(cfg.model.compile_mode))
        log.info("torch.compile (mode %s): %d decoder layers", cfg.model.compile_mode, n)
    groups, group_sizes = build_param_groups(model, cfg)
    client_optimizer, ds_config = configure_optimizer(groups, cfg.optim, ds_config, next(model.parameters()).device)
    total = cfg.optim.schedule_steps or cfg.trainer.max_steps

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
        )

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if client_optimizer else groups,
                                           optimizer=client_optimizer, config=ds_config, lr_scheduler=scheduler)
    return engine, ds_config, group_sizes
