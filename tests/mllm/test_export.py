"""save_export / load_export round trip on the tiny preset."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from data.vocab import CodeVocab
from mllm.export import load_export, load_viq, save_export
from mllm.model import build_mllm

VOCAB = CodeVocab(text_vocab_size=151665, embedding_rows=151936, codebook_size=500)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = {"[UNK]": 0, "hello": 1, "world": 2, "<eos>": 3}
    backend = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")


def batch_with_image():
    ids = torch.tensor([[5, 6, VOCAB.vision_start_id, VOCAB.image_pad_id, VOCAB.image_pad_id, VOCAB.row_end_id,
                         VOCAB.image_pad_id, VOCAB.image_pad_id, VOCAB.row_end_id, VOCAB.vision_end_id, 7, 8, 9]])
    codes = torch.randint(VOCAB.code_base, VOCAB.code_base + VOCAB.codebook_size, (4, 4), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids, "codes": codes}


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tied):
    torch.manual_seed(0)
    model = build_mllm("tiny", VOCAB, attn_implementation="sdpa", tie_word_embeddings=tied)
    with torch.no_grad():  # a merger that is not at its initial value, so loading it is what is tested
        model.merger.weight.add_(0.01 * torch.randn_like(model.merger.weight))
        model.merger.bias.add_(0.01)
    tokenizer = tiny_tokenizer()
    out = save_export(model, tokenizer, VOCAB, tmp_path / "hf")
    assert out == tmp_path / "hf" and not (tmp_path / "hf.partial").exists()
    assert {"config.json", "merger.safetensors", "vocab.json", "viq_mllm.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "vocab.json").read_text()) == VOCAB.to_dict()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB.total_rows

    loaded, loaded_tokenizer, loaded_vocab = load_export(out, device="cpu", dtype=torch.float32)
    assert loaded_vocab == VOCAB and not loaded.training
    assert loaded.llm.config.tie_word_embeddings == tied
    assert loaded_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"] == [1, 2]
    batch = batch_with_image()
    with torch.no_grad():
        expected = model(batch, return_logits=True)
        actual = loaded(batch, return_logits=True)
    assert torch.equal(actual["logits"], expected["logits"])
    assert torch.equal(actual["loss_sum"], expected["loss_sum"])
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_overwrites_atomically_and_carries_the_viq_directory(tmp_path):
    torch.manual_seed(0)
    model = build_mllm("tiny", VOCAB, attn_implementation="sdpa")
    viq_dir = tmp_path / "viq_src"
    viq_dir.mkdir()
    (viq_dir / "config.json").write_text('{"preset": "test"}')
    save_export(model, None, VOCAB, tmp_path / "hf")
    with torch.no_grad():
        model.merger.bias.fill_(0.5)
    save_export(model, None, VOCAB, tmp_path / "hf", viq_dir)
    assert not (tmp_path / "hf.previous").exists() and not (tmp_path / "hf.partial").exists()
    assert (tmp_path / "hf" / "viq" / "config.json").read_text() == '{"preset": "test"}'
    loaded, tokenizer, _ = load_export(tmp_path / "hf")
    assert tokenizer is None
    assert torch.equal(loaded.merger.bias, torch.full((64,), 0.5))


def test_state_dict_override_is_what_gets_written(tmp_path):
    torch.manual_seed(0)
    model = build_mllm("tiny", VOCAB, attn_implementation="sdpa")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["merger.bias"] = torch.full((64,), 2.0)
    state["llm.model.norm.weight"] = torch.full((64,), 3.0)
    save_export(model, None, VOCAB, tmp_path / "hf", state_dict=state)
    loaded, _, _ = load_export(tmp_path / "hf")
    assert torch.equal(loaded.merger.bias, state["merger.bias"])
    assert torch.equal(loaded.llm.model.norm.weight, state["llm.model.norm.weight"])
    with pytest.raises(KeyError, match="neither 'llm.' nor 'merger.'"):
        save_export(model, None, VOCAB, tmp_path / "bad", state_dict={"head.weight": torch.zeros(1)})


def test_loading_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a ViQ-MLLM export: missing config.json, merger.safetensors"):
        load_export(tmp_path)
    with pytest.raises(FileNotFoundError, match="saved without a ViQ tokenizer"):
        load_viq(tmp_path)


def test_bf16_load(tmp_path):
    torch.manual_seed(0)
    model = build_mllm("tiny", VOCAB, attn_implementation="sdpa")
    save_export(model, None, VOCAB, tmp_path / "hf")
    loaded, _, _ = load_export(tmp_path / "hf", dtype=torch.bfloat16)
    assert loaded.merger.weight.dtype == torch.bfloat16
    assert loaded.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = loaded(batch_with_image())
    assert torch.isfinite(out["loss_sum"]) and out["loss_sum"].dtype == torch.float32
