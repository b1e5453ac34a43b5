"""The extended vocabulary inside the LLM: growing the embedding for the code ids, and split tables.

`extend_vocabulary` grows a Qwen2.5 embedding (and an untied head) from the checkpoint's row
count to `CodeVocab.total_rows` and initialises only the new rows. `SplitEmbedding` /
`SplitHead` hold the text rows and the code rows as two Parameters so that the optimizer can
give the new rows their own learning rate; `split_tables` / `merge_tables` convert a causal
LM between the two layouts exactly.

Plain single-device PyTorch: under ZeRO-3 the caller passes a `gathered` context factory
(deepspeed.zero.GatheredParameters) instead of this module importing DeepSpeed.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2ForCausalLM

from data.vocab import CodeVocab
from mllm.loss import fused_linear_cross_entropy

_STATS_CHUNK_ROWS = 16384


def no_gather(params: Sequence[nn.Parameter], modifier_rank: int | None = None):
    """Default `gathered` factory: parameters are whole already (no ZeRO-3)."""
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Vocabulary extension
# ---------------------------------------------------------------------------------------------

def _row_stats(weight: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (fp32, on CPU) of weight[:n_rows], without an fp32 copy of the whole matrix."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, n_rows, _STATS_CHUNK_ROWS):
        chunk = weight[start : min(start + _STATS_CHUNK_ROWS, n_rows)].double()
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    mean = total / n_rows
    std = (total_sq / n_rows - mean * mean).clamp_min(0).sqrt()
    return mean.float().cpu(), std.float().cpu()


def _codebook_rows(features: torch.Tensor, hidden: int, mean, std, generator) -> torch.Tensor:
    """A fixed random projection of the FSQ code vectors, standardised to the embedding's per-dim statistics."""
    projection = torch.randn(features.shape[1], hidden, generator=generator)
    projected = features.float().cpu() @ projection
    projected = (projected - projected.mean(0)) / projected.std(0).clamp_min(1e-6)
    return mean + projected * std


def _init_new_rows(weight, vocab: CodeVocab, init: str, features, noise_std: float, generator) -> None:
    """Write rows [embedding_rows, total_rows) of `weight` in place; rows below embedding_rows are untouched."""
    mean, std = _row_stats(weight, vocab.text_vocab_size)
    n_new = vocab.total_rows - vocab.embedding_rows
    rows = mean + torch.randn(n_new, weight.shape[1], generator=generator) * (noise_std * std)
    if init == "codebook":
        rows[: vocab.codebook_size] = _codebook_rows(features, weight.shape[1], mean, std, generator)
    weight[vocab.embedding_rows :] = rows.to(device=weight.device, dtype=weight.dtype)


EMBEDDING_INITS = ("mean", "codebook")


def extend_vocabulary(
    llm: Qwen2ForCausalLM,
    vocab: CodeVocab,
    *,
    init: str = "mean",
    codebook_features: torch.Tensor | None = None,
    noise_std: float = 0.05,
    seed: int = 0,
    gathered: Callable = no_gather,
) -> None:
    """Grow the LLM's embedding (and untied output head) from vocab.embedding_rows to vocab.total_rows.

    Rows [0, embedding_rows) keep their values, the checkpoint's padding rows
    [text_vocab_size, embedding_rows) included; only the new rows [embedding_rows, total_rows) are
    written. init='mean': mean of the trained rows [0, text_vocab_size) plus Gaussian noise of
    `noise_std` x their per-dimension std. init='codebook': code rows [code_base, code_base + K)
    from a fixed random projection of `codebook_features` ([K, d], the FSQ implicit codebook)
    scaled to the trained rows' mean/std; row_end and padding rows as for 'mean'. An untied output
    head always gets 'mean' rows. `gathered(params, modifier_rank=0)` is entered around reads and
    writes (deepspeed.zero.GatheredParameters under ZeRO-3, supplied by the caller).
    """
    if init not in EMBEDDING_INITS:
        raise ValueError(f"unknown embedding init {init!r}; valid: {list(EMBEDDING_INITS)}")
    rows = llm.get_input_embeddings().num_embeddings
    if rows != vocab.embedding_rows:
        raise ValueError(
            f"LLM embedding has {rows} rows but CodeVocab.embedding_rows is {vocab.embedding_rows}: "
            f"lay out the code vocabulary against this LLM (embedding_rows={rows})"
        )
    if init == "codebook":
        if codebook_features is None or codebook_features.ndim != 2 or codebook_features.shape[0] != vocab.codebook_size:
            shape = None if codebook_features is None else tuple(codebook_features.shape)
            raise ValueError(
                f"init='codebook' needs codebook_features of shape [{vocab.codebook_size}, d] (the FSQ implicit codebook); got {shape}"
            )
        if vocab.codebook_size < 2:
            raise ValueError("init='codebook' needs at least 2 codes to standardise the projection; use init='mean'")
    tied = bool(llm.config.tie_word_embeddings)

    llm.resize_token_embeddings(vocab.total_rows, mean_resizing=False)
    llm.config.vocab_size = vocab.total_rows
    embedding = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight
    if tied and head is not embedding:
        raise RuntimeError("config says tie_word_embeddings but lm_head.weight is not the embedding after resizing")

    generator = torch.Generator().manual_seed(seed)
    params = [embedding] if tied else [embedding, head]
    with gathered(params, modifier_rank=0), torch.no_grad():
        for param in params:
            if tuple(param.shape) != (vocab.total_rows, llm.config.hidden_size):
                raise RuntimeError(
                    f"after resizing, a vocabulary matrix has shape {tuple(param.shape)} inside gathered(), expected "
                    f"({vocab.total_rows}, {llm.config.hidden_size}): under ZeRO-3 pass deepspeed.zero.GatheredParameters "
                    "as `gathered` and keep transformers' HfDeepSpeedConfig alive, or extend before deepspeed.initialize"
                )
        _init_new_rows(embedding, vocab, init, codebook_features, noise_std, generator)
        if not tied:
            _init_new_rows(head, vocab, "mean", None, noise_std, generator)


# ---------------------------------------------------------------------------------------------
# Split vocabulary tables: text rows and code rows as separate Parameters
# ---------------------------------------------------------------------------------------------

TEXT_ROWS = "text_rows"
CODE_ROWS = "code_rows"


class SplitEmbedding(nn.Module):
    """An nn.Embedding of `text_rows.shape[0] + code_rows.shape[0]` rows stored as two Parameters.

    text_rows: [code_base, H] (tokenizer entries + the checkpoint's padding rows); code_rows:
    [total_rows - code_base, H] (code ids, row_end and the padding past it). Two tensors let the
    optimizer give the new rows their own learning rate: Adam normalises per element, so scaling
    gradient rows cannot do that, and ZeRO flattens parameters. Both tables are read on every call
    (a lookup of index 0 stands in for the other table's ids), so each ZeRO-3 rank gathers the
    same parameters every step; no copy of the full matrix is ever built.
    """

    def __init__(self, text_rows: nn.Parameter, code_rows: nn.Parameter, padding_idx: int | None = None):
        super().__init__()
        self.text_rows = text_rows
        self.code_rows = code_rows
        self.padding_idx = padding_idx  # kept for merging back into an identical nn.Embedding
        # Sizes fixed while the tables are whole: a ZeRO-3 shard's shape is 0 outside forward.
        self.code_base = text_rows.shape[0]
        self.num_embeddings = text_rows.shape[0] + code_rows.shape[0]
        self.embedding_dim = text_rows.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_code = ids >= self.code_base
        # Out-of-range ids still fail in F.embedding: negative ids on the text side, ids past the
        # last row on the code side.
        text = F.embedding(torch.where(is_code, 0, ids), self.text_rows)
        code = F.embedding(torch.where(is_code, ids - self.code_base, 0), self.code_rows)
        return torch.where(is_code.unsqueeze(-1), code, text)

    def extra_repr(self) -> str:
        return f"text_rows={tuple(self.text_rows.shape)}, code_rows={tuple(self.code_rows.shape)}"


class SplitHead(nn.Module):
    """Bias-free output head over split tables: logits = [h @ text_rows.T, h @ code_rows.T].

    For a tied model the two Parameters are the SplitEmbedding's own (shared, not copied); the
    logits of the two halves are concatenated, never the weight matrices.
    """

    def __init__(self, text_rows: nn.Parameter, code_rows: nn.Parameter, shape: tuple[int, int] | None = None):
        super().__init__()
        self.text_rows = text_rows
        self.code_rows = code_rows
        # `shape` (rows, hidden) when the tables may be ZeRO-3 shards already (a tied head made
        # after its embedding); otherwise read from the whole tables.
        self.out_features, self.in_features = shape or (text_rows.shape[0] + code_rows.shape[0], text_rows.shape[1])

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, chunk_size: int = 0) -> torch.Tensor:
        """Logits; with `targets`, the fused loss over both tables (see mllm.loss.LinearHead for why here)."""
        if targets is None:
            return torch.cat([F.linear(hidden, self.text_rows), F.linear(hidden, self.code_rows)], dim=-1)
        return fused_linear_cross_entropy(hidden, torch.cat([self.text_rows, self.code_rows]), targets, chunk_size)

    fused_loss = True  # its forward takes targets (mllm.loss.use_fused_loss_head keeps it)

    def extra_repr(self) -> str:
        return f"text_rows={tuple(self.text_rows.shape)}, code_rows={tuple(self.code_rows.shape)}"


def _split_parameter(weight: nn.Parameter, code_base: int) -> tuple[nn.Parameter, nn.Parameter]:
    with torch.no_grad():
        text = nn.Parameter(weight[:code_base].clone(), requires_grad=weight.requires_grad)
        code = nn.Parameter(weight[code_base:].clone(), requires_grad=weight.requires_grad)
    return text, code


def _merged_parameter(text_rows: nn.Parameter, code_rows: nn.Parameter) -> nn.Parameter:
    with torch.no_grad():
        weight = torch.cat([text_rows, code_rows])
    return nn.Parameter(weight, requires_grad=text_rows.requires_grad or code_rows.requires_grad)


# ---------------------------------------------------------------------------------------------


def tables_split(llm) -> bool:
    """True while the LLM's embedding (and head) are SplitEmbedding / SplitHead."""
    return isinstance(llm.get_input_embeddings(), SplitEmbedding)


def split_tables(llm, vocab: CodeVocab, gathered: Callable = no_gather) -> None:
    """Replace the embedding and head of `llm` by split tables at `vocab.code_base` (values copied exactly).

    Under ZeRO-3 pass `gathered` (deepspeed.zero.GatheredParameters) and call it inside the
    partitioning context: the tables are read whole, copied, and the new modules' Parameters
    are partitioned as they are made.
    """
    if tables_split(llm):
        return
    code_base = vocab.code_base
    embedding, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    tied = bool(llm.config.tie_word_embeddings)
    if getattr(head, "bias", None) is not None:
        raise ValueError("split_code_rows: the output head has a bias; only bias-free heads (Qwen2.5) can be split")
    if tied and head.weight is not embedding.weight:
        raise RuntimeError("split_code_rows: config says tie_word_embeddings but lm_head.weight is not the embedding")
    expected = (vocab.total_rows, llm.config.hidden_size)
    with gathered([embedding.weight] if tied else [embedding.weight, head.weight], modifier_rank=None):
        for what, module in (("input embedding", embedding), ("output head", head)):
            if tuple(module.weight.shape) != expected:
                raise RuntimeError(
                    f"split_code_rows: {what} weight has shape {tuple(module.weight.shape)}, expected {expected}; "
                    "split after extend_vocabulary, with `gathered` under ZeRO-3"
                )
        text, code = _split_parameter(embedding.weight, code_base)
        head_tables = (text, code) if tied else _split_parameter(head.weight, code_base)
    llm.set_input_embeddings(SplitEmbedding(text, code, padding_idx=embedding.padding_idx))
    llm.set_output_embeddings(SplitHead(*head_tables, shape=expected))
    _declare_tied_tables(llm)


def merge_tables(llm) -> None:
    """Inverse of split_tables: a plain nn.Embedding / bias-free nn.Linear (re-tied when tied)."""
    if not tables_split(llm):
        return
    embedding, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    weight = _merged_parameter(embedding.text_rows, embedding.code_rows)
    merged_embedding = nn.Embedding(
        *weight.shape, padding_idx=embedding.padding_idx, _weight=weight.data, _freeze=not weight.requires_grad
    )
    head_weight = merged_embedding.weight if llm.config.tie_word_embeddings else _merged_parameter(head.text_rows, head.code_rows)
    merged_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    merged_head.weight = head_weight
    llm.set_input_embeddings(merged_embedding)
    llm.set_output_embeddings(merged_head)
    _declare_tied_tables(llm)


def _declare_tied_tables(llm) -> None:
    """Keep transformers' tied-weight bookkeeping true to the current modules.

    Qwen2ForCausalLM declares `lm_head.weight -> model.embed_tokens.weight`; split, neither name
    exists, and tie_weights() would fail on the missing source. While split (and tied) the
    declaration names the split tables instead, so a tie_weights() call re-ties the already
    shared Parameters (a no-op) and save_pretrained drops the head's duplicates.
    """
    if tables_split(llm) and llm.config.tie_word_embeddings:
        llm._tied_weights_keys = {f"lm_head.{n}": f"model.embed_tokens.{n}" for n in (TEXT_ROWS, CODE_ROWS)}
    else:
        llm.__dict__.pop("_tied_weights_keys", None)  # back to the class declaration
    llm.all_tied_weights_keys = llm.get_expanded_tied_weights_keys(all_submodels=False)
