"""LoRA fine-tuning of the Qwen2.5 body with peft, the new code rows trained in full.

On a discrete-token MLLM the code rows of the embedding (and of an untied head) start from
initialisation, so they must train as full parameters while the body is adapted and the text
rows stay frozen. Here:

- `apply_lora(model, settings)` injects peft LoRA layers into the decoder of `model.llm` in
  place (`peft.inject_adapter_in_model`: the LLM stays a `Qwen2ForCausalLM` whose linear
  layers carry adapters, so `ViQMLLM`'s forward, `decoder_layer_class`, activation
  checkpointing and `torch.compile` see the same structure), stores the code rows in their
  own tensors (`ViQMLLM.split_code_rows`) and leaves trainable exactly: the adapters, the code
  rows, the code merger, and the text rows only when `model.lora.train_text_rows` asks.
- `merge_lora_state_dict` folds the adapters into a state dict with peft's own `merge()`, one
  layer at a time, so `hf/` is a standard Qwen2 checkpoint that loads without peft (and works
  the same on a ZeRO-3 consolidated state dict). The peft-format adapter export lives in
  `mllm/lora_export.py`.

This module never imports DeepSpeed, and imports peft only when LoRA is used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from viq.config import ConfigError
from viq.ranges import at_least, between, positive

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name: one adapter per training run
ADAPTER_MARK = "lora_"  # peft's prefix of adapter parameters (lora_A, lora_B, lora_magnitude_vector)
QWEN2_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """`model.lora`: LoRA on the decoder's linear layers; code rows always train in full."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # scaling alpha / rank (alpha / sqrt(rank) with use_rslora)
    dropout: float = 0.0  # on each adapter's input
    target_modules: list[str] = field(default_factory=lambda: list(QWEN2_LINEAR_MODULES))
    layers: list[int] = field(default_factory=list)  # decoder layers that get adapters; empty: all
    use_rslora: bool = False  # rank-stabilised scaling (peft use_rslora)
    use_dora: bool = False  # weight-decomposed LoRA (peft use_dora)
    train_text_rows: bool = False  # also train the text rows of the embedding / head in full
    export_adapter: bool = False  # also write hf-adapter/: the adapter alone, peft format, beside the base

    RANGES: ClassVar[dict] = {"rank": positive(), "alpha": positive(), "dropout": between(0, 1, high_open=True),
                              "layers": at_least(0)}

    def validate(self, cfg) -> None:
        """ConfigError naming the key for settings that cannot work (called by TrainConfig.validate)."""
        if not self.enabled:
            return
        if self.rank <= 0:
            raise ConfigError(f"config key 'model.lora.rank' must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"config key 'model.lora.alpha' must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'model.lora.dropout' must be in [0, 1), got {self.dropout}")
        unknown = [m for m in self.target_modules if m not in QWEN2_LINEAR_MODULES]
        if unknown or not self.target_modules:
            raise ConfigError(
                f"config key 'model.lora.target_modules' has {unknown or 'nothing'}; valid: {', '.join(QWEN2_LINEAR_MODULES)} "
                "(the code rows of the embedding and head always train in full; text rows: model.lora.train_text_rows)")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"config key 'model.lora.layers' must list distinct layer indices >= 0, got {self.layers}")
        if cfg.freeze.llm_body:
            raise ConfigError("config keys 'freeze.llm_body' and 'model.lora.enabled' are both set: LoRA already keeps the "
                              "body's weights frozen and trains adapters on them; to train only the code rows, disable model.lora")
        if cfg.freeze.text_embeddings and self.train_text_rows:
            raise ConfigError("config keys 'freeze.text_embeddings' and 'model.lora.train_text_rows' contradict each other")
        if self.export_adapter:
            from mllm.presets import LLM_PRESETS

            if cfg.model.llm in LLM_PRESETS:
                raise ConfigError(f"config key 'model.lora.export_adapter' needs model.llm to be a local checkpoint "
                                  f"directory, not the preset '{cfg.model.llm}': an adapter is only usable beside its base weights")
            if self.train_text_rows:
                raise ConfigError("config key 'model.lora.export_adapter' needs the text rows frozen (model.lora.train_text_rows="
                                  "false): the adapter carries the LoRA weights and the code rows, not a changed base vocabulary")


def peft_lora_config(settings: LoraSettings, target_modules: list[str] | None = None):
    """The peft LoraConfig of `settings` (`target_modules` replaces the configured ones)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(target_modules or settings.target_modules),
        layers_to_transform=list(settings.layers) if settings.layers and target_modules is None else None,
        use_rslora=settings.use_rslora, use_dora=settings.use_dora, bias="none",
    )


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_MARK in name


def has_lora(llm: nn.Module) -> bool:
    """True when peft adapters are injected into `llm` (a merged-and-unloaded model keeps the
    `peft_config` attribute but no adapter parameters)."""
    return ADAPTER in getattr(llm, "peft_config", {}) and any(is_adapter_parameter(n) for n, _ in llm.named_parameters())


def apply_lora(model, settings: LoraSettings) -> dict[str, int]:
    """Inject LoRA into `model.llm` (a ViQMLLM's Qwen2 causal LM) and set what trains; returns the counts.

    Call it while the parameters are whole (before deepspeed.initialize), after the vocabulary
    is extended. The code rows move into their own tensors (split tables) so they can train
    while the text rows stay frozen.
    """
    from peft import inject_adapter_in_model

    llm = model.llm
    if has_lora(llm):
        raise RuntimeError("LoRA is already applied to this model")
    n_layers = len(llm.model.layers)
    outside = [i for i in settings.layers if i >= n_layers]
    if outside:
        raise ConfigError(f"config key 'model.lora.layers' has {outside}: the LLM has {n_layers} decoder layers (0-{n_layers - 1})")
    model.split_code_rows()
    inject_adapter_in_model(peft_lora_config(settings), llm, adapter_name=ADAPTER)
    set_llm_trainable(model, True, text_rows=settings.train_text_rows)
    counts = lora_trainable_counts(model)
    # What finally trains is the trainer's to report (tokenizer training freezes the code rows again).
    log.info("LoRA r=%d alpha=%g on %s%s: %s adapter parameters", settings.rank, settings.alpha,
             ", ".join(settings.target_modules), f" of layers {settings.layers}" if settings.layers else "",
             f"{counts['adapters']:,}")
    return counts


def _trains_under_lora(name: str, *, code_rows: bool, text_rows: bool) -> bool:
    return is_adapter_parameter(name) or (code_rows and name.endswith(".code_rows")) or (
        text_rows and name.endswith(".text_rows"))


def set_llm_trainable(model, train: bool, *, code_rows: bool = True, text_rows: bool = False) -> None:
    """requires_grad of the LLM inside `model` (a ViQMLLM). With LoRA, training it means the
    adapters, plus the code rows / text rows as asked, never the base weights; without LoRA,
    the whole LLM (the flags do not apply)."""
    llm = model.llm
    if not has_lora(llm):
        llm.requires_grad_(train)
        return
    for name, p in llm.named_parameters():
        p.requires_grad_(train and _trains_under_lora(name, code_rows=code_rows, text_rows=text_rows))


def lora_trainable_counts(model) -> dict[str, int]:
    """Trainable parameter counts of the LLM by kind: adapters, code rows, text rows, other."""
    counts = {"adapters": 0, "code rows": 0, "text rows": 0, "other": 0}
    for name, p in model.llm.named_parameters():
        if not p.requires_grad:
            continue
        kind = ("adapters" if is_adapter_parameter(name) else "code rows" if name.endswith(".code_rows")
                else "text rows" if name.endswith(".text_rows") else "other")
        counts[kind] += p.numel()
    return counts


def check_lora_trainable(model, *, code_rows: bool = True, text_rows: bool = False) -> dict[str, int]:
    """Assert that in the LLM exactly the adapters train, plus the code rows / text rows as asked;
    returns the counts for the log. A base weight left trainable would silently turn LoRA into
    full training of that matrix."""
    wrong = [f"{name} ({'trainable' if p.requires_grad else 'frozen'})" for name, p in model.llm.named_parameters()
             if p.requires_grad != _trains_under_lora(name, code_rows=code_rows, text_rows=text_rows)]
    if wrong:
        raise RuntimeError(f"with model.lora, {len(wrong)} LLM parameter(s) train against the plan: {', '.join(wrong[:5])}")
    return lora_trainable_counts(model)


# ---------------------------------------------------------------------------------------------
# Merging adapters into a state dict
# ---------------------------------------------------------------------------------------------

_LORA_A = f".lora_A.{ADAPTER}.weight"


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], peft_config) -> dict[str, torch.Tensor]:
    """A state dict with peft LoRA layers -> the same model's plain layout, adapters folded in (a new dict).

    For every adapted module '<m>': '<m>.base_layer.weight' / '.bias' and its adapter tensors
    ('<m>.lora_A.default.weight', '<m>.lora_B.default.weight', DoRA's magnitude) become
    '<m>.weight' / '<m>.bias'. The fold is peft's own `merge()` on a one-layer copy in fp32
    (vanilla, rsLoRA and DoRA alike), cast back to the stored dtype, on the host; the live model
    is never touched. Works on a ZeRO-3 consolidated state dict as on `model.state_dict()`. A state dict
    without adapters comes back with the same entries.
    """
    modules = sorted(k[: -len(_LORA_A)] for k in state_dict if k.endswith(_LORA_A))
    merged = dict(state_dict)
    for prefix in modules:
        parts = {k[len(prefix) + 1:]: merged.pop(k) for k in [k for k in merged if k.startswith(prefix + ".")]}
        weight, bias = _merge_one_layer(parts, peft_config, prefix)
        merged[f"{prefix}.weight"] = weight
        if bias is not None:
            merged[f"{prefix}.bias"] = bias
    leftover = [k for k in merged if is_adapter_parameter(k) or ".base_layer." in k]
    if leftover:
        raise KeyError(f"adapter tensors without a complete LoRA layer in the state dict: {leftover[:4]}")
    return merged


def _merge_one_layer(parts: dict[str, torch.Tensor], peft_config, where: str):
    """(merged weight, bias or None) of one adapted nn.Linear, through peft's merge()."""
    import dataclasses

    from peft import inject_adapter_in_model

    weight, bias = parts["base_layer.weight"], parts.get("base_layer.bias")
    holder = nn.Module()
    holder.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    holder.proj.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    if bias is not None:
        holder.proj.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    one_layer = dataclasses.replace(peft_config, target_modules=["proj"], layers_to_transform=None, layers_pattern=None,
                                    lora_dropout=0.0, inference_mode=True)
    inject_adapter_in_model(one_layer, holder, adapter_name=ADAPTER)
    state = {f"proj.{k}": v.detach().float() for k, v in parts.items()}
    missing, unexpected = holder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{where}: LoRA layer tensors do not match peft's layout (missing {missing}, unexpected {unexpected})")
    holder.proj.merge(safe_merge=True)  # raises on a non-finite result
    base = holder.proj.get_base_layer()
    # On the host: an export writes them there anyway, and on a GPU still holding the training
    # state a merged copy of every adapted matrix would not fit beside it.
    merged_bias = None if bias is None else base.bias.detach().to(device="cpu", dtype=bias.dtype)
    return base.weight.detach().to(device="cpu", dtype=weight.dtype), merged_bias
