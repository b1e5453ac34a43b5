"""What the engine and the trainer ask of a model they train.

Every module handed to `Trainer` (the MLLM on codes, the tokenizer-training model, the
throughput benchmark's continuous-encoder arms) satisfies `TrainableModel`. `check_model`
runs before DeepSpeed sees the model: a missing member is a bug (TypeError, with the list),
a setting the model cannot honour is the user's (one ConfigError naming the key and why).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from viq.config import ConfigError


@runtime_checkable
class TrainableModel(Protocol):
    """The members `mllm/engine.py` and `mllm/trainer.py` use.

    - `llm`: the Hugging Face causal LM inside (its config gives FLOPs and the attention backend);
    - `vocab`: the `data.vocab.CodeVocab` the batches are laid out with;
    - `code_rows_split`: the embedding / head hold the code rows in their own Parameters;
    - `decoder_layer_class`: the block class that activation checkpointing and compilation target;
    - `forward(batch)`: {'loss_sum': fp32 sum of token CE, 'n_supervised': count, optional
      'aux_loss': a mean already, optional 'logs': {name: scalar}};
    - `gradient_checkpointing_enable(fraction)` / `compile_decoder_layers(**torch.compile kwargs)`: return how many
      layers (or blocks) they applied to;
    - `unsupported_settings(cfg)`: {config key: why} for settings this model cannot honour.
    """

    llm: nn.Module
    vocab: object

    @property
    def code_rows_split(self) -> bool: ...

    @property
    def decoder_layer_class(self) -> type[nn.Module]: ...

    def forward(self, batch: dict) -> dict: ...

    def gradient_checkpointing_enable(self, fraction: float = 1.0) -> int: ...

    def compile_decoder_layers(self, **compile_kwargs) -> int: ...

    def unsupported_settings(self, cfg) -> dict[str, str]: ...


CONTRACT_MEMBERS = ("llm", "vocab", "code_rows_split", "decoder_layer_class", "forward",
                    "gradient_checkpointing_enable", "compile_decoder_layers", "unsupported_settings")


def check_model(model, cfg) -> None:
    """TypeError for a model that lacks part of the contract; ConfigError for a setting it cannot honour."""
    missing = [name for name in CONTRACT_MEMBERS if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} does not satisfy mllm.contract.TrainableModel: missing {', '.join(missing)}")
    unsupported = model.unsupported_settings(cfg)
    if unsupported:
        key, why = next(iter(unsupported.items()))
        raise ConfigError(f"config key '{key}': {why}")
