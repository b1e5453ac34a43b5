"""Split vocabulary tables (text rows / code rows as separate Parameters) for a separate code-row LR."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from mllm.config import load_config
from mllm.engine import apply_freezing, build_param_groups
from mllm.export import load_export, merge_split_tables, save_export
from mllm.vocab_tables import SplitEmbedding, SplitHead
from tests.mllm.test_model import EOS, VOCAB, make_model, make_sample, pack
from viq.config import ConfigError

CODE_BASE, TOTAL = VOCAB.code_base, VOCAB.total_rows


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def merged_model(request):
    """A model whose merger and code rows are off their initial values, so every table matters."""
    model = make_model(seed=3, tie_word_embeddings=request.param)
    with torch.no_grad():
        model.merger.weight.add_(0.02 * torch.randn_like(model.merger.weight))
        model.llm.get_output_embeddings().weight[CODE_BASE:].add_(0.1)
    return model


def split_copy(model):
    split = copy.deepcopy(model)
    split.split_code_rows()
    return split


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    samples = [make_sample(gen, 12, (2, 3)), make_sample(gen, 20, None), make_sample(gen, 9, (3, 2))]
    packed = pack(samples)
    # Supervise some code ids and the row-end id too, so the head's code rows get a target gradient.
    packed["labels"][0, 5:9] = torch.tensor([CODE_BASE, CODE_BASE + 7, VOCAB.row_end_id, TOTAL - 1])
    return packed


def test_split_then_merge_is_an_exact_round_trip(merged_model):
    tied = merged_model.llm.config.tie_word_embeddings
    embedding = merged_model.llm.get_input_embeddings().weight.detach().clone()
    head = merged_model.llm.get_output_embeddings().weight.detach().clone()
    model = split_copy(merged_model)
    emb, out = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    assert isinstance(emb, SplitEmbedding) and isinstance(out, SplitHead) and model.code_rows_split
    assert emb.text_rows.shape == (CODE_BASE, 64) and emb.code_rows.shape == (TOTAL - CODE_BASE, 64)
    assert emb.num_embeddings == out.out_features == TOTAL == model.llm.config.vocab_size
    assert torch.equal(emb.text_rows, embedding[:CODE_BASE]) and torch.equal(emb.code_rows, embedding[CODE_BASE:])
    assert torch.equal(out.text_rows, head[:CODE_BASE]) and torch.equal(out.code_rows, head[CODE_BASE:])
    names = [n for n, _ in model.named_parameters() if n.endswith("_rows")]
    if tied:
        assert out.text_rows is emb.text_rows and out.code_rows is emb.code_rows
        assert names == ["llm.model.embed_tokens.text_rows", "llm.model.embed_tokens.code_rows"]
    else:
        assert out.text_rows is not emb.text_rows
        assert names == ["llm.model.embed_tokens.text_rows", "llm.model.embed_tokens.code_rows",
                         "llm.lm_head.text_rows", "llm.lm_head.code_rows"]
    # transformers' own re-tying keeps the split tables as they are (shared when tied, separate when not)
    model.llm.tie_weights()
    assert (model.llm.lm_head.code_rows is model.llm.model.embed_tokens.code_rows) == tied
    model.split_code_rows()  # already split: nothing changes
    assert model.llm.get_input_embeddings() is emb

    model.merge_code_rows()
    emb, out = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    assert type(emb) is torch.nn.Embedding and type(out) is torch.nn.Linear and out.bias is None
    assert not model.code_rows_split and model.llm.config.vocab_size == TOTAL
    assert torch.equal(emb.weight, embedding) and torch.equal(out.weight, head)
    assert (out.weight is emb.weight) == tied
    model.llm.tie_weights()
    assert (model.llm.lm_head.weight is model.llm.model.embed_tokens.weight) == tied
    assert model.state_dict().keys() == merged_model.state_dict().keys()


def test_split_embedding_looks_up_each_id_in_its_table():
    text, code = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4, 3))
    table = torch.cat([text, code]).detach()
    emb = SplitEmbedding(text, code)
    ids = torch.tensor([[0, 4, 5, 8], [6, 1, 8, 0]])
    assert torch.equal(emb(ids), table[ids])
    emb(ids).sum().backward()
    # each id's row gets one unit of gradient per occurrence; the stand-in lookups add exact zeros
    assert text.grad[:, 0].tolist() == [2, 1, 0, 0, 1] and code.grad[:, 0].tolist() == [1, 1, 0, 2]
    with pytest.raises(IndexError):
        emb(torch.tensor([9]))
    with pytest.raises(IndexError):
        emb(torch.tensor([-1]))


def test_split_model_gives_the_same_loss_gradients_and_logits(merged_model, batch):
    tied = merged_model.llm.config.tie_word_embeddings
    reference = copy.deepcopy(merged_model)
    split = split_copy(merged_model)
    out_ref = reference(batch, return_logits=True)
    out_split = split(batch, return_logits=True)
    assert torch.equal(out_split["logits"], out_ref["logits"])
    assert torch.equal(out_split["loss_sum"], out_ref["loss_sum"])
    assert int(out_split["n_supervised"]) == int(out_ref["n_supervised"])
    out_ref["loss_sum"].backward()
    out_split["loss_sum"].backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    split_grads = {n: p.grad for n, p in split.named_parameters()}
    mapped = {"llm.model.embed_tokens.weight": torch.cat(
        [split_grads.pop("llm.model.embed_tokens.text_rows"), split_grads.pop("llm.model.embed_tokens.code_rows")])}
    if not tied:
        mapped["llm.lm_head.weight"] = torch.cat(
            [split_grads.pop("llm.lm_head.text_rows"), split_grads.pop("llm.lm_head.code_rows")])
    split_grads.update(mapped)
    assert split_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(split_grads[name], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()), msg=name)
    code_grad = mapped["llm.model.embed_tokens.weight"][CODE_BASE:]
    assert float(code_grad.abs().sum()) > 0  # the comparison covers rows that actually learn


def test_generation_through_the_split_head_gives_the_same_tokens(merged_model):
    gen = torch.Generator().manual_seed(11)
    prompts = [make_sample(gen, n, grid)[::2] for n, grid in [(4, (2, 2)), (11, None), (7, (1, 3))]]
    expected = merged_model.generate_from_codes(prompts, max_new_tokens=6, eos_token_id=EOS)
    split = split_copy(merged_model)
    assert split.generate_from_codes(prompts, max_new_tokens=6, eos_token_id=EOS) == expected
    assert all(len(tokens) == 6 for tokens in expected)


def config(*overrides):
    return load_config(None, ["optim.code_embedding_lr=1e-2", "optim.lr=1e-3", "optim.weight_decay=0.1", *overrides])


def test_param_groups_put_code_rows_and_merger_in_the_code_group(merged_model):
    tied = merged_model.llm.config.tie_word_embeddings
    with pytest.raises(ConfigError, match=r"call model.split_code_rows\(\) first"):
        build_param_groups(merged_model, config())
    split = split_copy(merged_model)
    groups, sizes = build_param_groups(split, config())
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in split.named_parameters()}
    code = [names[id(p)] for p in by_name["code"]["params"]]
    expected = ["llm.model.embed_tokens.code_rows"] + ([] if tied else ["llm.lm_head.code_rows"]) + ["merger.weight", "merger.bias"]
    assert code == expected
    assert by_name["code"]["lr"] == 1e-2 and by_name["code"]["weight_decay"] == 0.0
    no_decay = [names[id(p)] for p in by_name["no_decay"]["params"]]
    assert "llm.model.embed_tokens.text_rows" in no_decay and ("llm.lm_head.text_rows" in no_decay) != tied
    assert by_name["no_decay"]["lr"] == by_name["decay"]["lr"] == 1e-3 and by_name["decay"]["weight_decay"] == 0.1
    assert sum(sizes.values()) == len(list(split.parameters()))
    # without a code LR the split model is grouped as before
    groups, sizes = build_param_groups(split, config("optim.code_embedding_lr=0"))
    assert "code" not in sizes and sum(sizes.values()) == len(list(split.parameters()))


def test_adamw_moves_code_rows_by_the_code_lr_and_text_rows_by_the_lr(merged_model, batch):
    split = split_copy(merged_model)
    groups, _ = build_param_groups(split, config("optim.weight_decay=0"))
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    tables = {n: p for n, p in split.named_parameters() if n.endswith("_rows")}
    before = {n: p.detach().clone() for n, p in tables.items()}
    split(batch)["loss_sum"].backward()
    grads = {n: p.grad.clone() for n, p in tables.items()}
    optimizer.step()
    # Adam's first step (bias-corrected) moves each element by lr * g / (|g| + eps): lr wherever |g| >> eps.
    for name, p in tables.items():
        lr = 1e-2 if name.endswith("code_rows") else 1e-3
        g = grads[name]
        assert int((g.abs() > 1e-4).sum()) > 1000, name
        step = p.detach() - before[name]
        torch.testing.assert_close(step, -lr * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-8, msg=name)
        assert float(step.abs().max()) == pytest.approx(lr, rel=1e-4), name


def test_freezing_text_embeddings_of_a_split_model_freezes_the_text_tables(merged_model):
    tied = merged_model.llm.config.tie_word_embeddings
    split = split_copy(merged_model)
    report = apply_freezing(split, config("freeze.text_embeddings=true"))  # weight decay is fine: frozen outright
    frozen = ["llm.model.embed_tokens.text_rows"] + ([] if tied else ["llm.lm_head.text_rows"])
    assert report["frozen_params"] == frozen and report["masked_embedding_rows"] == []
    assert not split.llm.get_output_embeddings().text_rows.requires_grad
    assert split.llm.get_output_embeddings().code_rows.requires_grad
    groups, sizes = build_param_groups(split, config())
    assert sum(sizes.values()) == len([p for p in split.parameters() if p.requires_grad])
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_export_of_a_split_model_is_a_standard_merged_checkpoint(merged_model, batch, tmp_path):
    tied = merged_model.llm.config.tie_word_embeddings
    split = split_copy(merged_model)
    out = save_export(split, None, VOCAB, tmp_path / "hf")
    assert split.code_rows_split  # the live model is left as it was
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert "model.embed_tokens.weight" in keys and ("lm_head.weight" in keys) != tied
        assert not [k for k in keys if k.endswith("_rows")]
        assert fh.get_slice("model.embed_tokens.weight").get_shape() == [TOTAL, 64]
    loaded, _, vocab = load_export(out)
    assert vocab == VOCAB and not loaded.code_rows_split
    assert type(loaded.llm.get_input_embeddings()) is torch.nn.Embedding
    assert (loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight) == tied
    with torch.no_grad():
        expected = split(batch, return_logits=True)["logits"]
        actual = loaded(batch, return_logits=True)["logits"]
    assert torch.equal(actual, expected)
    for name, value in merged_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_save_export_merges_a_state_dict_with_split_names(merged_model, tmp_path):
    """The ZeRO-3 path: the trainer hands over the consolidated dict of the split model."""
    tied = merged_model.llm.config.tie_word_embeddings
    split = split_copy(merged_model)
    state = {k: v.clone() for k, v in split.state_dict().items()}
    assert ("llm.lm_head.code_rows" in state) and "llm.model.embed_tokens.weight" not in state
    state["llm.model.embed_tokens.code_rows"] += 1.0
    if tied:  # a consolidated dict names a tied table twice, as one tensor
        state["llm.lm_head.text_rows"] = state["llm.model.embed_tokens.text_rows"]
        state["llm.lm_head.code_rows"] = state["llm.model.embed_tokens.code_rows"]
    else:
        state["llm.lm_head.code_rows"] -= 1.0
    save_export(split, None, VOCAB, tmp_path / "hf", state_dict=state)
    loaded, _, _ = load_export(tmp_path / "hf")
    embedding = loaded.llm.get_input_embeddings().weight
    assert torch.equal(embedding[:CODE_BASE], state["llm.model.embed_tokens.text_rows"])
    assert torch.equal(embedding[CODE_BASE:], state["llm.model.embed_tokens.code_rows"])
    head = loaded.llm.get_output_embeddings().weight
    assert torch.equal(head[CODE_BASE:], state["llm.lm_head.code_rows"])
    assert torch.equal(head[:CODE_BASE], state["llm.lm_head.text_rows"])


def test_merge_split_tables_errors():
    text, code = torch.zeros(3, 2), torch.ones(1, 2)
    plain = {"llm.model.embed_tokens.weight": torch.zeros(4, 2), "merger.bias": torch.zeros(2)}
    assert merge_split_tables(plain, tied=True) == plain
    merged = merge_split_tables({"llm.model.embed_tokens.text_rows": text, "llm.model.embed_tokens.code_rows": code,
                                 "llm.lm_head.text_rows": text.clone(), "llm.lm_head.code_rows": code.clone()}, tied=True)
    assert list(merged) == ["llm.model.embed_tokens.weight"] and merged["llm.model.embed_tokens.weight"][3, 0] == 1
    with pytest.raises(KeyError, match=r"split table 'llm.model.embed_tokens.text_rows' but not 'llm.model.embed_tokens.code_rows'"):
        merge_split_tables({"llm.model.embed_tokens.text_rows": text}, tied=True)
    with pytest.raises(ValueError, match=r"tie_word_embeddings is set but the state_dict's 'llm.lm_head' tables differ"):
        merge_split_tables({"llm.model.embed_tokens.text_rows": text, "llm.model.embed_tokens.code_rows": code,
                            "llm.lm_head.text_rows": text + 1, "llm.lm_head.code_rows": code}, tied=True)
    with pytest.raises(KeyError, match=r"untied model: state_dict has neither 'llm.lm_head.weight'"):
        merge_split_tables({"llm.model.embed_tokens.text_rows": text, "llm.model.embed_tokens.code_rows": code}, tied=False)
