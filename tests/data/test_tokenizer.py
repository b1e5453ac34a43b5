"""The offline Qwen2.5 tokenizer: ids, special tokens, chat template, cache and export."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from data.tokenizer import (
    PRESET_EMBEDDING_ROWS,
    QWEN25_ADDED_TOKENS,
    build_tokenizer,
    codebook_size_of,
)
from data.vocab import CodeVocab

QWEN25_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<|fim_prefix|>": 151659,
    "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="module")
def built(cache_dir):
    return build_tokenizer("qwen2.5-0.5b", 64000, cache_dir=cache_dir)


def test_vocabulary_size_and_special_ids(built):
    tokenizer, vocab = built
    assert len(tokenizer) == 151665
    for token, token_id in QWEN25_SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert tokenizer.convert_ids_to_tokens(list(range(151643, 151665))) == [t for t, _ in QWEN25_ADDED_TOKENS]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None


def test_special_flags_match_qwen25(built):
    tokenizer, _ = built
    decoder = tokenizer.added_tokens_decoder
    assert sorted(decoder) == list(range(151643, 151665))
    specials = {i for i, t in decoder.items() if t.special}
    assert specials == set(range(151643, 151657))  # tool-call / FIM / repo tokens are not special
    # Qwen3-only additions must not exist: <think> is plain text here.
    think = tokenizer("<think>", add_special_tokens=False)["input_ids"]
    assert think == [13708, 766, 29]
    assert max(tokenizer("<tool_response></think>", add_special_tokens=False)["input_ids"]) < 151643


def test_known_strings_tokenize_to_known_ids(built):
    tokenizer, _ = built
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"] == [151644, 872, 198]
    assert tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"] == [151644, 77091, 198]
    assert tokenizer("system", add_special_tokens=False)["input_ids"] == [8948]
    text = "Hello world, 你好！ x = 3.14"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_is_qwen25(built):
    tokenizer, _ = built
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(custom, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # No Qwen3 thinking block on the last assistant turn.
    assert "<think>" not in tokenizer.apply_chat_template(messages + [{"role": "user", "content": "x"}], tokenize=False)


def test_chat_template_tools_branch(built):
    tokenizer, _ = built
    tool = {"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object"}}}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}], tools=[tool], tokenize=False)
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    )
    assert text.endswith("</tool_call><|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n")


def test_code_vocab_layout(built):
    tokenizer, vocab = built
    assert vocab.text_vocab_size == len(tokenizer) == 151665
    assert vocab.embedding_rows == 151936
    assert vocab.code_base == 151936
    assert vocab.codebook_size == 64000
    assert vocab.row_end_id == 151936 + 64000


def test_presets_embedding_rows(cache_dir):
    assert build_tokenizer("tiny", 16, cache_dir=cache_dir)[1].embedding_rows == 151936
    assert build_tokenizer("qwen2.5-1.5b", 16, cache_dir=cache_dir)[1].embedding_rows == 151936
    # The 7B checkpoint pads its embedding to 152,064 rows, so its codes start there.
    assert build_tokenizer("qwen2.5-7b", 16, cache_dir=cache_dir)[1].code_base == 152064
    assert build_tokenizer("qwen2.5-72b", 16, cache_dir=cache_dir)[1].code_base == 152064
    assert set(PRESET_EMBEDDING_ROWS) == {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-72b", "tiny"}


def test_cache_is_written_once_and_copies_are_independent(cache_dir, built):
    entries = [p for p in cache_dir.iterdir() if p.name.startswith("tokenizer-qwen2.5-")]
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tokenizer-")]  # no staging left over
    first, _ = build_tokenizer("tiny", 8, cache_dir=cache_dir)
    first.add_tokens(["<extra>"])
    second, _ = build_tokenizer("tiny", 8, cache_dir=cache_dir)
    assert len(first) == 151666 and len(second) == 151665


def test_save_pretrained_round_trip(built, tmp_path):
    tokenizer, _ = built
    export = tmp_path / "export"
    tokenizer.save_pretrained(export)
    loaded = AutoTokenizer.from_pretrained(export, local_files_only=True)
    assert len(loaded) == 151665
    text = "<|im_start|>user\nWhat is 2+2? 数学<|im_end|>\n<|vision_start|><|image_pad|><|vision_end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id) == (151645, 151643)

    # A local directory goes through build_tokenizer too; rows come from config.json when present.
    from_dir, vocab = build_tokenizer(str(export), 1000)
    assert len(from_dir) == 151665 and vocab.embedding_rows == 151936
    (export / "config.json").write_text(json.dumps({"vocab_size": 152064}))
    assert build_tokenizer(str(export), 1000)[1].code_base == 152064


def test_codebook_size_forms():
    assert codebook_size_of(64000) == 64000
    assert codebook_size_of({"levels": [8, 8, 8, 5, 5, 5]}) == 64000
    assert codebook_size_of(SimpleNamespace(levels=(4, 4))) == 16
    assert codebook_size_of({"codebook_size": 12}) == 12
    with pytest.raises(ValueError, match="neither 'levels' nor 'codebook_size'"):
        codebook_size_of({"dim": 4})
    with pytest.raises(TypeError, match="cannot read a codebook size from str"):
        codebook_size_of("64000")
    with pytest.raises(ValueError, match="must be positive"):
        codebook_size_of(0)


def test_unknown_preset_names_the_valid_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen2.5-72b, tiny"):
        build_tokenizer("qwen9-huge", 16)
    with pytest.raises(FileNotFoundError, match="neither a tokenizer preset"):
        build_tokenizer(str(tmp_path / "missing"), 16)


def test_viq_config_gives_the_codebook_size(cache_dir):
    from viq.model import VIQ_PRESETS

    for name, config in VIQ_PRESETS.items():
        _, vocab = build_tokenizer("tiny", config, cache_dir=cache_dir)
        assert vocab.codebook_size == config.codebook_size, name
        assert vocab.row_end_id == 151936 + config.codebook_size


def test_model_export_directory_keeps_its_code_layout(built, tmp_path):
    tokenizer, vocab = built
    export = tmp_path / "hf"
    tokenizer.save_pretrained(export)
    # An export's config counts the extended embedding; its vocab.json holds the layout.
    (export / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": vocab.total_rows}))
    saved = CodeVocab(text_vocab_size=151665, embedding_rows=151936, codebook_size=64000, pad_to=128)
    (export / "vocab.json").write_text(json.dumps(saved.to_dict()))
    loaded, layout = build_tokenizer(str(export), 64000)
    assert layout == saved and layout.total_rows == 216064 and len(loaded) == 151665
    assert loaded("Hello world")["input_ids"] == [9707, 1879]
    with pytest.raises(ValueError, match="trained with a codebook of 64000 codes, but the ViQ config gives 1000"):
        build_tokenizer(str(export), 1000)
