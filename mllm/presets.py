"""Named LLM presets and `build_llm`: a Qwen2.5 decoder from a preset (random init) or a local checkpoint.

The Qwen2.5 presets carry the hyper-parameters of the released checkpoints' `config.json`
(Qwen2.5-{0.5B,1.5B,7B,72B}-Instruct). Note that the 7B model's embedding has 152,064 rows, not
151,936 like the small ones: the code vocabulary must be laid out against the row count of the
model actually built (`CodeVocab.embedding_rows == llm.get_input_embeddings().num_embeddings`).
`tiny` has the 0.5B vocabulary and a toy body, for CPU tests and smoke runs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from data.tokenizer import PRESET_EMBEDDING_ROWS
from mllm.attention import resolve_attn_implementation

_QWEN25_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

LLM_PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": {
        **_QWEN25_COMMON,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_window_layers": 24,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        **_QWEN25_COMMON,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_window_layers": 21,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        **_QWEN25_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_window_layers": 28,
        "tie_word_embeddings": False,
    },
    "qwen2.5-72b": {  # for planning and multi-node runs: build it under ZeRO-3, or point model.llm at a checkpoint
        **_QWEN25_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_window_layers": 80,
        "tie_word_embeddings": False,
    },
    "tiny": {
        **_QWEN25_COMMON,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
    },
}


def preset_config(name: str, **overrides) -> Qwen2Config:
    """The Qwen2Config of a preset; `overrides` replace single fields (e.g. tie_word_embeddings=False).

    The embedding's row count comes from data.tokenizer.PRESET_EMBEDDING_ROWS, the one table of it.
    """
    if name not in LLM_PRESETS:
        raise KeyError(f"unknown LLM preset {name!r}; valid presets: {sorted(LLM_PRESETS)} (or a local checkpoint dir)")
    return Qwen2Config(**{"vocab_size": PRESET_EMBEDDING_ROWS[name], **LLM_PRESETS[name], **overrides})


def build_llm(
    name_or_path: str | Path,
    *,
    attn_implementation: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **config_overrides,
) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM from a preset name (random init: seed torch before calling) or a local HF dir.

    Checkpoints load with `local_files_only=True` and never with remote code.
    `attn_implementation` is a key of `mllm.attention.ATTENTION_BACKENDS` ('auto' picks per device).
    """
    attn = resolve_attn_implementation(attn_implementation, device)
    name = str(name_or_path)
    if name in LLM_PRESETS:
        config = preset_config(name, **config_overrides)
        # Build directly in the target dtype and on the target device: a 7B model in fp32 would need
        # 30 GB of host memory first, and random init on a GPU takes a fraction of the CPU's time.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            llm = Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"{name}/config.json missing: not a Hugging Face checkpoint directory")
        if config_overrides:
            raise ValueError(f"config overrides {sorted(config_overrides)} only apply to presets, not to checkpoint {name}")
        llm = Qwen2ForCausalLM.from_pretrained(
            name, local_files_only=True, trust_remote_code=False, attn_implementation=attn, dtype=dtype
        )
    else:
        raise ValueError(
            f"LLM {name!r} is neither a preset {sorted(LLM_PRESETS)} nor an existing local checkpoint directory"
        )
    if device is not None:
        llm.to(device)
    return llm
