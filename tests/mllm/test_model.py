"""ViQMLLM on the tiny preset (CPU, fp32, sdpa): packing isolation, vocabulary extension, merger, generation."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from data.vocab import CodeVocab
from mllm.attention import ATTENTION_BACKENDS, resolve_attn_implementation
from mllm.model import CodeMerger, ViQMLLM, _varlen_kwargs, build_mllm, extend_vocabulary
from mllm.presets import LLM_PRESETS, build_llm, preset_config

K = 1000
VOCAB = CodeVocab(text_vocab_size=151665, embedding_rows=151936, codebook_size=K)
EOS = 151645


def make_model(seed: int = 0, **overrides) -> ViQMLLM:
    torch.manual_seed(seed)
    overrides.setdefault("attn_implementation", "sdpa")
    return build_mllm("tiny", VOCAB, seed=seed, **overrides)


@pytest.fixture(scope="module")
def model() -> ViQMLLM:
    return make_model()


@pytest.fixture(scope="module")
def untied_model() -> ViQMLLM:
    """A random tied model mostly repeats its last input token; an untied head gives varied greedy output."""
    return make_model(tie_word_embeddings=False)


def make_sample(gen: torch.Generator, n_text: int, grid: tuple[int, int] | None):
    """(input_ids [L], labels [L], codes [h*w, 4]): text, optionally an image block, more text; answer supervised."""
    text = lambda n: torch.randint(0, 5000, (n,), generator=gen)  # noqa: E731
    parts = [text(3)]
    codes = torch.zeros((0, 4), dtype=torch.long)
    if grid is not None:
        h, w = grid
        block = [VOCAB.vision_start_id]
        for _ in range(h):
            block += [VOCAB.image_pad_id] * w + [VOCAB.row_end_id]
        block.append(VOCAB.vision_end_id)
        parts.append(torch.tensor(block))
        codes = torch.randint(VOCAB.code_base, VOCAB.code_base + K, (h * w, 4), generator=gen)
    parts.append(text(n_text))
    ids = torch.cat(parts)
    labels = ids.clone()
    labels[: len(ids) - n_text // 2] = -100  # prompt and image unsupervised, second half of the text supervised
    return ids, labels, codes


def alone(sample) -> dict:
    ids, labels, codes = sample
    return {"input_ids": ids[None], "labels": labels[None], "codes": codes, "position_ids": torch.arange(len(ids))[None]}


def pack(samples, restart_positions: bool = True) -> dict:
    ids = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    lengths = [len(s[0]) for s in samples]
    if restart_positions:
        positions = torch.cat([torch.arange(n) for n in lengths])
    else:
        positions = torch.arange(len(ids))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": positions[None],
        "cu_seqlens": cu,
        "codes": torch.cat([s[2] for s in samples]),
    }


@pytest.fixture(scope="module")
def samples():
    gen = torch.Generator().manual_seed(1)
    return [make_sample(gen, 12, (2, 3)), make_sample(gen, 20, None), make_sample(gen, 9, (3, 2))]


def grads(model: ViQMLLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, rel: float) -> None:
    """Every gradient within `rel` x its largest entry (fp32 sums in a different order differ by round-off)."""
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        scale = float(g.abs().max())
        assert float((actual[name] - g).abs().max()) <= rel * scale + 1e-9, name


def test_packed_equals_unpacked_losses_and_gradients(model, samples):
    model.zero_grad()
    alone_losses, total, count = [], 0.0, 0
    for s in samples:
        out = model(alone(s))
        alone_losses.append(out["loss_sum"].detach())
        count += int(out["n_supervised"])
        total = total + out["loss_sum"]
    total.backward()
    alone_grads = grads(model)

    model.zero_grad()
    packed = pack(samples)
    per_sample = model.per_sample_losses(packed)
    assert [c for _, c in per_sample] == [int((s[1][1:] != -100).sum()) for s in samples]
    torch.testing.assert_close(torch.stack([l.detach() for l, _ in per_sample]), torch.stack(alone_losses), rtol=1e-5, atol=1e-5)
    out = model(packed)
    assert int(out["n_supervised"]) == count
    assert out["loss_sum"].dtype == torch.float32
    torch.testing.assert_close(out["loss_sum"].detach(), sum(alone_losses), rtol=1e-5, atol=1e-5)
    out["loss_sum"].backward()
    packed_grads = grads(model)
    assert packed_grads.keys() == alone_grads.keys() == {n for n, _ in model.named_parameters()}
    assert_grads_close(packed_grads, alone_grads, rel=2e-5)
    model.zero_grad()


def test_packing_without_restarting_positions_leaks_between_samples(model, samples):
    with torch.no_grad():
        alone_losses = [model(alone(s))["loss_sum"] for s in samples]
        leaked = model.per_sample_losses(pack(samples, restart_positions=False))
    # The first sample sees nothing before it; the later ones attend across the boundary.
    torch.testing.assert_close(leaked[0][0], alone_losses[0], rtol=1e-5, atol=1e-5)
    for (loss, _), reference in zip(leaked[1:], alone_losses[1:]):
        assert abs(float(loss) - float(reference)) > 1e-3


def test_last_sample_logits_ignore_the_preceding_samples(model, samples):
    changed_first = (torch.randint(0, 5000, samples[0][0].shape), samples[0][1], samples[0][2].flip(0))
    changed_first[0][samples[0][0] == VOCAB.image_pad_id] = VOCAB.image_pad_id
    changed_first[0][samples[0][0] == VOCAB.row_end_id] = VOCAB.row_end_id
    last_len = len(samples[2][0])
    with torch.no_grad():
        base = model(pack(samples), return_logits=True)["logits"][0, -last_len:]
        isolated = model(pack([changed_first, *samples[1:]]), return_logits=True)["logits"][0, -last_len:]
        crossing = model(pack([changed_first, *samples[1:]], restart_positions=False), return_logits=True)["logits"]
        crossing_base = model(pack(samples, restart_positions=False), return_logits=True)["logits"]
    torch.testing.assert_close(isolated, base, rtol=0, atol=1e-5)
    assert (crossing[0, -last_len:] - crossing_base[0, -last_len:]).abs().max() > 1e-3


def test_two_rows_of_packed_samples(model, samples):
    gen = torch.Generator().manual_seed(5)
    # text 3 + image block 4 + n_text: choose n_text so both rows have the same length
    fourth = make_sample(gen, len(samples[0][0]) + len(samples[1][0]) - len(samples[2][0]) - 7, (1, 1))
    rows = [pack(samples[:2]), pack([samples[2], fourth])]
    assert rows[0]["input_ids"].shape == rows[1]["input_ids"].shape
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "codes")}
    with torch.no_grad():
        per_sample = model.per_sample_losses(batch)
        expected = [model(alone(s))["loss_sum"] for s in [*samples, fourth]]
    torch.testing.assert_close(torch.stack([l for l, _ in per_sample]), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_chunked_loss_matches_one_chunk_and_plain_cross_entropy(samples):
    model = make_model()
    batch = pack(samples)
    with torch.no_grad():
        model.loss_chunk_size = 0
        whole = model(batch, return_logits=True)
        model.loss_chunk_size = 3
        chunked = model(batch)
    logits = whole["logits"][0, :-1].float()
    targets = batch["labels"][0, 1:]
    reference = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(chunked["loss_sum"], reference, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(whole["loss_sum"], reference, rtol=1e-6, atol=1e-4)
    # recomputed chunks give the same gradients as kept ones
    model.zero_grad()
    model(batch)["loss_sum"].backward()
    recomputed = grads(model)
    model.zero_grad()
    model.checkpoint_loss_chunks = False
    model(batch)["loss_sum"].backward()
    assert_grads_close(recomputed, grads(model), rel=1e-6)


def test_batch_without_images_still_runs_the_merger(model):
    ids = torch.randint(0, 5000, (1, 10))
    model.zero_grad()
    out = model({"input_ids": ids, "labels": ids, "codes": torch.zeros((0, 4), dtype=torch.long)})
    out["loss_sum"].backward()
    assert model.merger.weight.grad is not None and model.merger.bias.grad is not None
    assert float(model.merger.weight.grad.abs().sum()) == 0.0
    model.zero_grad()
    # nothing supervised: the output head still runs, the loss is an exact zero
    out = model({"input_ids": ids, "labels": torch.full_like(ids, -100)})
    assert float(out["loss_sum"].detach()) == 0.0 and int(out["n_supervised"]) == 0


def test_codes_count_and_range_errors(model, samples):
    batch = pack(samples)
    with pytest.raises(ValueError, match=r"input_ids hold 12 image_pad positions .* codes has 11 rows"):
        model({**batch, "codes": batch["codes"][:-1]})
    with pytest.raises(ValueError, match=r"codes must be extended-vocabulary ids in \[151936, 152936\)"):
        model({**batch, "codes": batch["codes"] - VOCAB.code_base})
    with pytest.raises(ValueError, match=r"shape \[M, 4\]"):
        model({**batch, "codes": batch["codes"][:, :3]})


def test_merger_starts_at_the_mean_and_is_order_aware(model):
    codes = torch.randint(VOCAB.code_base, VOCAB.code_base + K, (2, 4))
    ids = torch.tensor([[VOCAB.vision_start_id, VOCAB.image_pad_id, VOCAB.image_pad_id, VOCAB.row_end_id]])
    with torch.no_grad():
        merged = model.embed_inputs(ids, codes)[0, 1:3]
        table = model.llm.get_input_embeddings().weight
        torch.testing.assert_close(merged, table[codes].mean(1), rtol=0, atol=1e-7)
        torch.testing.assert_close(model.embed_inputs(ids, codes)[0, 3], table[VOCAB.row_end_id])
    merger = CodeMerger(8)
    torch.testing.assert_close(merger.weight, torch.cat([torch.eye(8)] * 4, 1) / 4)
    assert float(merger.bias.detach().abs().sum()) == 0.0
    with torch.no_grad():
        merger.weight.add_(torch.randn_like(merger.weight))
    sub = torch.randn(3, 4, 8)
    assert (merger(sub) - merger(sub[:, [1, 0, 3, 2]])).abs().max() > 1e-3


def test_extend_vocabulary_tied_keeps_old_rows_and_appends_past_the_padding():
    torch.manual_seed(0)
    llm = build_llm("tiny", attn_implementation="sdpa")
    before = llm.get_input_embeddings().weight.detach().clone()
    assert before.shape[0] == 151936
    calls = []

    def gathered(params, modifier_rank=None):
        calls.append(([tuple(p.shape) for p in params], modifier_rank))
        return contextlib.nullcontext()

    extend_vocabulary(llm, VOCAB, init="mean", noise_std=0.05, seed=3, gathered=gathered)
    weight = llm.get_input_embeddings().weight.detach()
    assert weight.shape == (VOCAB.total_rows, 64) and VOCAB.total_rows % 64 == 0
    assert llm.config.vocab_size == VOCAB.total_rows
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert calls == [([(VOCAB.total_rows, 64)], 0)]
    assert torch.equal(weight[:151936], before)  # text rows and padding rows [151665, 151936) untouched
    mean, std = before[:151665].mean(0), before[:151665].std(0)
    new = weight[151936:]
    assert new.shape[0] == VOCAB.total_rows - 151936
    assert ((new - mean).abs() <= 6 * 0.05 * std).all()  # near the mean, within 6 sigma of the noise
    assert ((new - mean).std(0) / std).mean().item() == pytest.approx(0.05, rel=0.1)  # noise is std-scaled
    logits = llm(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == VOCAB.total_rows


def test_extend_vocabulary_untied_head_gets_mean_rows():
    torch.manual_seed(0)
    llm = build_llm("tiny", attn_implementation="sdpa", tie_word_embeddings=False)
    emb_before = llm.get_input_embeddings().weight.detach().clone()
    head_before = llm.get_output_embeddings().weight.detach().clone()
    assert not torch.equal(emb_before, head_before)
    extend_vocabulary(llm, VOCAB, seed=0)
    emb, head = llm.get_input_embeddings().weight.detach(), llm.get_output_embeddings().weight.detach()
    assert emb.shape == head.shape == (VOCAB.total_rows, 64)
    assert torch.equal(emb[:151936], emb_before) and torch.equal(head[:151936], head_before)
    head_mean, head_std = head_before[:151665].mean(0), head_before[:151665].std(0)
    assert ((head[151936:] - head_mean).abs() <= 6 * 0.05 * head_std).all()
    emb_mean = emb_before[:151665].mean(0)
    # each matrix is initialised from its own statistics
    assert (head[151936:].mean(0) - head_mean).abs().max() < (head[151936:].mean(0) - emb_mean).abs().max()


def test_extend_vocabulary_codebook_init():
    torch.manual_seed(0)
    llm = build_llm("tiny", attn_implementation="sdpa")
    before = llm.get_input_embeddings().weight.detach().clone()
    levels = torch.tensor([8, 5, 5, 5])  # 1000 codes, FSQ values in [-1, 1]
    digits = torch.stack(torch.meshgrid(*[torch.arange(int(l)) for l in levels], indexing="ij"), -1).reshape(-1, 4)
    features = (digits.float() / (levels - 1) * 2 - 1)
    assert features.shape == (K, 4)
    extend_vocabulary(llm, VOCAB, init="codebook", codebook_features=features, seed=7)
    weight = llm.get_input_embeddings().weight.detach()
    assert torch.equal(weight[:151936], before)
    code_rows = weight[VOCAB.code_base : VOCAB.code_base + K]
    mean, std = before[:151665].mean(0), before[:151665].std(0)
    torch.testing.assert_close(code_rows.mean(0), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(code_rows.std(0), std, rtol=1e-2, atol=1e-5)
    # an affine image of the 4-d code vectors: rank 4 after centring, and near codes stay near
    assert torch.linalg.matrix_rank(code_rows - code_rows.mean(0), tol=1e-4) == 4
    tail = weight[VOCAB.row_end_id :]
    assert ((tail - mean).abs() <= 6 * 0.05 * std).all()
    with pytest.raises(ValueError, match=r"codebook_features of shape \[1000, d\]"):
        extend_vocabulary(build_llm("tiny"), VOCAB, init="codebook", codebook_features=features[:10])


def test_extend_vocabulary_rejects_a_mismatched_layout():
    llm = build_llm("tiny")
    with pytest.raises(ValueError, match=r"LLM embedding has 151936 rows but CodeVocab.embedding_rows is 152064"):
        extend_vocabulary(llm, CodeVocab(text_vocab_size=151665, embedding_rows=152064, codebook_size=K))
    with pytest.raises(ValueError, match="unknown embedding init 'zeros'; valid"):
        extend_vocabulary(llm, VOCAB, init="zeros")
    with pytest.raises(ValueError, match="call extend_vocabulary"):
        ViQMLLM(llm, VOCAB)


def test_generation_batched_equals_unbatched_and_uncached_greedy(untied_model):
    model = untied_model
    gen = torch.Generator().manual_seed(11)
    prompts = [make_sample(gen, n, grid)[::2] for n, grid in [(4, (2, 2)), (11, None), (7, (1, 3))]]
    batched = model.generate_from_codes(prompts, max_new_tokens=6, eos_token_id=EOS)
    single = [model.generate_from_codes([p], max_new_tokens=6, eos_token_id=EOS)[0] for p in prompts]
    assert batched == single
    assert all(len(tokens) == 6 and len(set(tokens)) > 1 for tokens in batched)
    for (ids, codes), tokens in zip(prompts, batched):
        greedy = []
        with torch.no_grad():
            for _ in range(6):
                seq = torch.cat([ids, torch.tensor(greedy, dtype=torch.long)])[None]
                nxt = int(model({"input_ids": seq, "codes": codes}, return_logits=True)["logits"][0, -1].argmax())
                if nxt == EOS:
                    break
                greedy.append(nxt)
        assert tokens == greedy


def test_generation_stops_at_eos(untied_model):
    model = untied_model
    gen = torch.Generator().manual_seed(12)
    prompt = make_sample(gen, 5, (1, 2))[::2]
    first = model.generate_from_codes([prompt], max_new_tokens=8, eos_token_id=EOS)[0]
    assert len(first) == 8
    stop = next(i for i in range(1, 8) if first[i] not in first[:i])  # a token that has not appeared yet
    assert model.generate_from_codes([prompt], max_new_tokens=8, eos_token_id=first[stop])[0] == first[:stop]


def test_presets_match_the_released_parameter_counts():
    expected = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}
    from transformers import Qwen2ForCausalLM

    for name, count in expected.items():
        with torch.device("meta"):
            llm = Qwen2ForCausalLM(preset_config(name))
        assert sum(p.numel() for p in llm.parameters()) == count, name
        assert llm.config.rope_parameters["rope_theta"] == 1e6 and llm.config.rms_norm_eps == 1e-6
    assert preset_config("qwen2.5-7b").tie_word_embeddings is False
    assert preset_config("qwen2.5-0.5b").tie_word_embeddings is True
    assert set(LLM_PRESETS) == {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-72b", "tiny"}
    with pytest.raises(KeyError, match=r"unknown LLM preset 'qwen9'; valid presets: \['qwen2.5-0.5b'"):
        preset_config("qwen9")
    with pytest.raises(ValueError, match="neither a preset"):
        build_llm("/nonexistent/qwen")


def test_attention_backend_choice():
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match=r"unknown attention 'flash'; valid: \['auto', 'sdpa'"):
        resolve_attn_implementation("flash", "cpu")
    with pytest.raises(ValueError, match="flex_attention' needs CUDA"):
        resolve_attn_implementation("flex_attention", "cpu")
    assert set(ATTENTION_BACKENDS) == {"sdpa", "eager", "flex_attention", "flash_attention_2"}


def test_eager_and_sdpa_agree_on_packed_rows(samples):
    eager = make_model(attn_implementation="eager")
    sdpa = make_model()
    with torch.no_grad():
        a = [l for l, _ in eager.per_sample_losses(pack(samples))]
        b = [l for l, _ in sdpa.per_sample_losses(pack(samples))]
    torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-5, atol=1e-5)


def test_decoder_layer_class_and_gradient_checkpointing(model, samples):
    assert model.decoder_layer_class is Qwen2DecoderLayer
    fresh = make_model()
    batch = pack(samples)
    reference = fresh(batch)["loss_sum"]
    reference.backward()
    expected = grads(fresh)
    fresh.zero_grad()
    fresh.train()
    fresh.gradient_checkpointing_enable()
    assert fresh.llm.model.gradient_checkpointing
    out = fresh(batch)["loss_sum"]
    out.backward()
    torch.testing.assert_close(out, reference)
    assert_grads_close(grads(fresh), expected, rel=1e-6)


def test_flash_varlen_arguments_cover_every_token():
    # two rows of packed samples, the second padded at its end: one flattened row of 4 segments + padding
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 0, 0]])
    kwargs = _varlen_kwargs(positions, None)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 8, 12, 14, 15, 16]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["max_length_q"] == 5
    given = _varlen_kwargs(positions[:1], torch.tensor([0, 3, 6], dtype=torch.int32))
    assert given["cu_seq_lens_k"].tolist() == [0, 3, 6, 8] and given["max_length_k"] == 3
    with pytest.raises(ValueError, match="cu_seqlens ends at 9 but the packed row has 8 tokens"):
        _varlen_kwargs(positions[:1], torch.tensor([0, 3, 9], dtype=torch.int32))
