"""The LoRA adapter alone, in peft's format, for users who keep the base checkpoint separate.

    runs/<name>/hf-adapter/
        adapter_config.json, adapter_model.safetensors   peft: the LoRA weights, and the code rows
                                                         as trainable tokens of embed_tokens (and of
                                                         lm_head when untied)
        merger.safetensors, vocab.json, viq_mllm.json    as in hf/ (the marker says "adapter")
        tokenizer files, viq/                            as in hf/

The code rows travel as peft's `trainable_token_indices` (only the listed rows are stored,
where `modules_to_save` would store both 216k-row matrices, text rows included; peft #2376);
an untied head lists `lm_head` too, which needs peft >= 0.18 (#2863). The rows sit past the
base's embedding, so the base's vocabulary is grown to the code layout before peft loads the
adapter:

    llm = Qwen2ForCausalLM.from_pretrained(base)
    llm.resize_token_embeddings(vocab.total_rows, mean_resizing=False)
    llm = PeftModel.from_pretrained(llm, "hf-adapter").merge_and_unload()

`load_adapter_export(adapter_dir, base)` does exactly that and returns the ViQMLLM; the merged
export `hf/` (mllm/export.py) needs neither peft nor the base.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.vocab import SUBCODES, CodeVocab
from mllm.export import (
    ADAPTER_FORMAT_NAME,
    FORMAT_VERSION,
    MARKER_FILE,
    MERGER_FILE,
    _split_state_dict,
    load_tokenizer,
    publish,
    read_vocab,
    staging_dir,
    write_companions,
)
from mllm.lora import ADAPTER, has_lora
from mllm.model import ViQMLLM
from mllm.presets import build_llm
from viq.errors import CheckpointError
from viq.io import read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # where peft's PeftModel keeps the wrapped causal LM
TOKEN_DELTA = "token_adapter.trainable_tokens_delta"  # peft's name for the new values of the listed rows


def save_adapter_export(model: ViQMLLM, tokenizer, vocab: CodeVocab, out_dir: str | Path, viq_dir_or_config=None, *,
                        base: str, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `out_dir` (atomically, like save_export): the adapter and code rows of a LoRA model in
    peft's format, for the base checkpoint `base`. `state_dict`: the full ViQMLLM state dict to
    read instead of the live parameters (a ZeRO-3 run's consolidated weights; call on one rank)."""
    from peft import get_peft_model_state_dict

    llm = model.llm
    if not has_lora(llm):
        raise ValueError("save_adapter_export needs a model with LoRA applied (mllm.lora.apply_lora)")
    if not model.code_rows_split:
        raise ValueError("save_adapter_export needs the code rows in their own tensors (apply_lora splits them)")
    llm_state, merger_state = _split_state_dict(model.state_dict() if state_dict is None else state_dict)
    adapter = get_peft_model_state_dict(llm, state_dict=llm_state, adapter_name=ADAPTER, save_embedding_layers=False)
    tensors = {PEFT_PREFIX + k: v for k, v in adapter.items()}
    rows = list(range(vocab.code_base, vocab.total_rows))
    token_indices = {"embed_tokens": rows}
    tensors[f"{PEFT_PREFIX}model.embed_tokens.{TOKEN_DELTA}"] = llm_state["model.embed_tokens.code_rows"]
    if not llm.config.tie_word_embeddings:  # a tied head follows the embedding's rows in peft
        token_indices["lm_head"] = rows
        tensors[f"{PEFT_PREFIX}lm_head.{TOKEN_DELTA}"] = llm_state["lm_head.code_rows"]
    expected = (vocab.total_rows - vocab.code_base, llm.config.hidden_size)
    for name in [n for n in tensors if n.endswith(TOKEN_DELTA)]:
        if tuple(tensors[name].shape) != expected:
            raise RuntimeError(f"{name} has shape {tuple(tensors[name].shape)}, expected {expected}: "
                               "pass the consolidated state dict of a ZeRO-3 run")
    config = dataclasses.replace(llm.peft_config[ADAPTER], trainable_token_indices=token_indices,
                                 base_model_name_or_path=str(base), task_type="CAUSAL_LM", inference_mode=True)
    out, partial = Path(out_dir), staging_dir(out_dir)
    config.save_pretrained(partial)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    marker = {"format": ADAPTER_FORMAT_NAME, "version": FORMAT_VERSION, "subcodes": SUBCODES,
              "hidden_size": model.merger.hidden_size, "base_model": str(base)}
    write_companions(partial, merger_state, vocab, marker, tokenizer, viq_dir_or_config)
    return publish(partial, out)


def load_adapter_export(adapter_dir: str | Path, base: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, *, attn_implementation: str = "auto"):
    """(ViQMLLM in eval mode, tokenizer or None, CodeVocab): `base` grown to the code layout, the
    adapter applied and merged by peft. `base` defaults to the path recorded at export."""
    from peft import PeftModel

    root = Path(adapter_dir)
    marker = read_json(root / MARKER_FILE, what="export marker")
    if marker.get("format") != ADAPTER_FORMAT_NAME:
        raise CheckpointError(f"{root / MARKER_FILE}: format {marker.get('format')!r}, expected {ADAPTER_FORMAT_NAME!r} "
                              "(a merged export loads with mllm.export.load_export)")
    base = str(base or marker["base_model"])
    vocab = read_vocab(root)
    llm = build_llm(base, attn_implementation=attn_implementation, dtype=dtype, device=device)
    rows = llm.get_input_embeddings().num_embeddings
    if rows != vocab.embedding_rows:
        raise CheckpointError(f"{root}: the adapter was trained on a base with {vocab.embedding_rows} embedding rows; "
                              f"{base} has {rows}")
    llm.resize_token_embeddings(vocab.total_rows, mean_resizing=False)
    llm.config.vocab_size = vocab.total_rows
    llm = PeftModel.from_pretrained(llm, str(root), is_trainable=False).merge_and_unload()
    model = ViQMLLM(llm, vocab)
    model.merger.load_state_dict(load_file(str(root / MERGER_FILE)))
    model.to(device=device).eval()
    return model, load_tokenizer(root), vocab
