"""Hugging Face style export of a trained ViQMLLM, loadable without the training code.

Layout of an export directory:
    config.json, model*.safetensors, generation_config.json   the LLM (save_pretrained)
    merger.safetensors                                         CodeMerger weights
    vocab.json                                                 CodeVocab.to_dict()
    viq_mllm.json                                              format marker + merger shape
    tokenizer files                                            tokenizer.save_pretrained
    viq/                                                       the ViQ tokenizer (optional)

Loading is local only and never runs remote code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.vocab import SUBCODES, CodeVocab
from mllm.lora import ADAPTER, has_lora, merge_lora_state_dict
from mllm.model import ViQMLLM
from mllm.vocab_tables import CODE_ROWS, TEXT_ROWS
from mllm.presets import build_llm
from viq.errors import CheckpointError

FORMAT_NAME = "viq-mllm"
FORMAT_VERSION = 1
ADAPTER_FORMAT_NAME = "viq-mllm-lora-adapter"  # hf-adapter/ (mllm/lora_export.py): needs its base to load
MERGER_FILE = "merger.safetensors"
VOCAB_FILE = "vocab.json"
MARKER_FILE = "viq_mllm.json"
VIQ_SUBDIR = "viq"


def _split_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    llm, merger = {}, {}
    for key, value in state_dict.items():
        if key.startswith("llm."):
            llm[key[len("llm.") :]] = value
        elif key.startswith("merger."):
            merger[key[len("merger.") :]] = value
        else:
            raise KeyError(f"state_dict key {key!r} belongs to neither 'llm.' nor 'merger.'")
    return llm, merger


EMBEDDING_PREFIX = "llm.model.embed_tokens"
HEAD_PREFIX = "llm.lm_head"


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr():
        return True  # one storage seen under two names (a tied parameter)
    return a.shape == b.shape and torch.equal(a, b.to(a))


def _pop_split_tables(state: dict, prefix: str) -> list[torch.Tensor] | None:
    names = [f"{prefix}.{TEXT_ROWS}", f"{prefix}.{CODE_ROWS}"]
    present = [name for name in names if name in state]
    if not present:
        return None
    if len(present) == 1:
        raise KeyError(f"state_dict has split table {present[0]!r} but not {(set(names) - set(present)).pop()!r}")
    if f"{prefix}.weight" in state:
        raise KeyError(f"state_dict has both split tables {names} and '{prefix}.weight'")
    return [state.pop(name) for name in names]


def merge_split_tables(state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """A ViQMLLM state dict with split vocabulary tables -> the standard layout (a new dict).

    '<table>.text_rows' + '<table>.code_rows' become '<table>.weight' (rows concatenated) for
    llm.model.embed_tokens and llm.lm_head. A tied model writes only the embedding: its head
    tables must be the embedding's (the same tensors or equal values). Other keys pass through;
    a state dict without split names comes back with the same entries.
    """
    merged = dict(state_dict)
    embedding = _pop_split_tables(merged, EMBEDDING_PREFIX)
    head = _pop_split_tables(merged, HEAD_PREFIX)
    if embedding is None:
        if head is not None:
            raise KeyError(f"state_dict has split '{HEAD_PREFIX}' tables but no '{EMBEDDING_PREFIX}.{TEXT_ROWS}' / '{CODE_ROWS}'")
        return merged
    merged[f"{EMBEDDING_PREFIX}.weight"] = torch.cat(embedding)
    if tied:
        if head is not None and not all(_same_values(h, e) for h, e in zip(head, embedding)):
            raise ValueError(f"tie_word_embeddings is set but the state_dict's '{HEAD_PREFIX}' tables differ from the embedding's")
    elif head is not None:
        merged[f"{HEAD_PREFIX}.weight"] = torch.cat(head)
    elif f"{HEAD_PREFIX}.weight" not in merged:
        raise KeyError(f"untied model: state_dict has neither '{HEAD_PREFIX}.weight' nor '{HEAD_PREFIX}.{TEXT_ROWS}' / '{CODE_ROWS}'")
    return merged


def save_export(
    model: ViQMLLM,
    tokenizer,
    vocab: CodeVocab,
    out_dir: str | Path,
    viq_dir_or_config=None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    vision_source: str = "codes",
) -> Path:
    """Write `out_dir` atomically (built beside it, then renamed into place).

    tokenizer: anything with `save_pretrained` (or None). viq_dir_or_config: a ViQ tokenizer
    directory to copy, an object with `save_pretrained` (e.g. viq.ViQModel), or None.
    state_dict: a full ViQMLLM state dict ('llm.*', 'merger.*') to write instead of the module's
    own parameters, e.g. the 16-bit consolidated weights of a ZeRO-3 run (call on one rank).
    The export always has the standard HF layout: LoRA adapters (mllm.lora) are folded into their
    layers and split vocabulary tables (ViQMLLM.split_code_rows) merged, in the model or in
    `state_dict`; the live model is untouched. vision_source "none" (the blind baseline) is recorded
    in the marker so that evaluation feeds the same fixed code the model was trained on.
    """
    lora = has_lora(model.llm)
    if state_dict is None and (model.code_rows_split or lora):
        state_dict = model.state_dict()
    if state_dict is not None:
        if lora:
            state_dict = merge_lora_state_dict(state_dict, model.llm.peft_config[ADAPTER])
        state_dict = merge_split_tables(state_dict, tied=bool(model.llm.config.tie_word_embeddings))
    llm_state, merger_state = _split_state_dict(state_dict) if state_dict is not None else (None, None)
    if merger_state is None:
        merger_state = model.merger.state_dict()
    out, partial = Path(out_dir), staging_dir(out_dir)
    model.llm.save_pretrained(partial, state_dict=llm_state)
    marker = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "subcodes": SUBCODES, "hidden_size": model.merger.hidden_size}
    if vision_source == "none":
        marker["vision_source"] = "none"
    write_companions(partial, merger_state, vocab, marker, tokenizer, viq_dir_or_config)
    return publish(partial, out)


def staging_dir(out_dir: str | Path) -> Path:
    """An empty `<out_dir>.partial` to build an export in (see publish)."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def write_companions(partial: Path, merger_state: dict, vocab: CodeVocab, marker: dict, tokenizer=None,
                     viq_dir_or_config=None) -> None:
    """What every export holds beside the LLM weights: merger, vocab.json, the marker, tokenizer, viq/."""
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in merger_state.items()},
        str(partial / MERGER_FILE),
        metadata={"format": "pt"},
    )
    (partial / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), indent=2) + "\n")
    (partial / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if viq_dir_or_config is not None:
        if isinstance(viq_dir_or_config, (str, Path)):
            source = Path(viq_dir_or_config)
            if not source.is_dir():
                raise FileNotFoundError(f"ViQ tokenizer directory {source} does not exist")
            shutil.copytree(source, partial / VIQ_SUBDIR)
        elif hasattr(viq_dir_or_config, "save_pretrained"):
            viq_dir_or_config.save_pretrained(partial / VIQ_SUBDIR)
        else:
            raise TypeError(
                f"viq_dir_or_config must be a directory path or an object with save_pretrained, got {type(viq_dir_or_config).__name__}"
            )


def publish(partial: Path, out: Path) -> Path:
    """Move a finished staging directory to `out`, replacing a previous export only once it is complete."""
    if out.exists():
        previous = out.with_name(out.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        out.rename(previous)
        partial.rename(out)
        shutil.rmtree(previous)
    else:
        partial.rename(out)
    return out


def load_export(
    export_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str = "auto",
):
    """(ViQMLLM in eval mode, tokenizer or None, CodeVocab) from a `save_export` directory."""
    root = Path(export_dir)
    if (root / MARKER_FILE).is_file() and json.loads((root / MARKER_FILE).read_text()).get("format") == ADAPTER_FORMAT_NAME:
        raise CheckpointError(f"{root} holds a LoRA adapter without its base weights: load the merged export (hf/) instead, "
                              f"or mllm.lora_export.load_adapter_export('{root}', base=<the base checkpoint directory>)")
    missing = [name for name in ("config.json", MERGER_FILE, VOCAB_FILE, MARKER_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a ViQ-MLLM export: missing {', '.join(missing)}")
    marker = json.loads((root / MARKER_FILE).read_text())
    if marker.get("format") != FORMAT_NAME or marker.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{root / MARKER_FILE}: format {marker.get('format')!r} v{marker.get('version')}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    vocab = read_vocab(root)
    llm = build_llm(root, attn_implementation=attn_implementation, dtype=dtype, device=device)
    model = ViQMLLM(llm, vocab)
    model.merger.load_state_dict(load_file(str(root / MERGER_FILE)))
    model.to(device=device).eval()
    return model, load_tokenizer(root), vocab


def is_blind_export(export_dir: str | Path) -> bool:
    """True for the export of a blind-baseline run (vision.source none): its images are one fixed code."""
    return json.loads((Path(export_dir) / MARKER_FILE).read_text()).get("vision_source") == "none"


def read_vocab(root: Path) -> CodeVocab:
    return CodeVocab.from_dict(json.loads((root / VOCAB_FILE).read_text()))


def load_tokenizer(root: Path):
    """The tokenizer saved in an export directory, or None."""
    if (root / "tokenizer.json").is_file():
        # The fast tokenizer exactly as saved: AutoTokenizer would pick a class from config.json's
        # model_type (qwen2) and rebuild the pipeline from the vocabulary instead.
        return PreTrainedTokenizerFast.from_pretrained(root, local_files_only=True)
    if (root / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    return None


def load_viq(export_dir: str | Path, device=None, dtype=None):
    """The ViQ tokenizer stored in `<export_dir>/viq` (imported lazily: the LLM side does not need it)."""
    path = Path(export_dir) / VIQ_SUBDIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path} missing: the export was saved without a ViQ tokenizer")
    from viq import ViQModel

    return ViQModel.from_pretrained(path, device=device, dtype=dtype)
