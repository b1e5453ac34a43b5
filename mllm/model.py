"""The multimodal model: a Qwen2.5 decoder whose vocabulary holds the ViQ code ids.

An image reaches the LLM as `image_pad` positions in `input_ids` (layout in `data/vocab.py`);
the [M, 4] extended-vocabulary ids of their 2x2 sub-codes travel beside them as `codes`. Each
position's input vector is `CodeMerger(embed(codes[i]))`: the four sub-code embeddings,
concatenated and projected back to the hidden size. Everything else is the plain HF model.
The same forward also takes continuous vectors for the image positions (`image_embeds`).

Plain single-device PyTorch: DeepSpeed (ZeRO, activation checkpointing) is applied from outside
(`mllm/engine.py`); the vocabulary tables live in `mllm/vocab_tables.py`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, Qwen2ForCausalLM

from data.vocab import SUBCODES, CodeVocab
from mllm.loss import LOSS_IMPLEMENTATIONS, chunked_linear_cross_entropy, use_fused_loss_head
from mllm.presets import build_llm
from mllm.vocab_tables import extend_vocabulary, merge_tables, no_gather, split_tables, tables_split

IGNORE_INDEX = -100


class CodeMerger(nn.Module):
    """[M, 4, H] sub-code embeddings -> [M, H]: concat then Linear(4H, H), started at their mean.

    Weight [I I I I] / 4 and bias 0 make the initial output the mean of the four embeddings, while
    the layer can learn which sub-code sits where (top-left, top-right, ...). Parameters are made
    with their initial values (not written after construction) so that a ZeRO-3 partitioning
    context around the constructor sees them initialised.
    """

    def __init__(self, hidden_size: int, subcodes: int = SUBCODES):
        super().__init__()
        self.hidden_size = hidden_size
        self.subcodes = subcodes
        eye = torch.eye(hidden_size)
        self.weight = nn.Parameter(torch.cat([eye] * subcodes, dim=1) / subcodes)
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, sub_embeds: torch.Tensor) -> torch.Tensor:
        return F.linear(sub_embeds.flatten(-2), self.weight, self.bias)


def checkpointed_layer_indices(n_layers: int, fraction: float) -> set[int]:
    """round(fraction * n_layers) layer indices spread evenly over [0, n_layers)."""
    k = round(fraction * n_layers)
    return {int(i * n_layers / k) for i in range(k)} if k else set()


def _varlen_kwargs(position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> dict:
    """flash-attn varlen arguments for the batch flattened into one row (one host sync per step)."""
    total = position_ids.numel()
    if cu_seqlens is not None and position_ids.shape[0] == 1:
        cu = cu_seqlens.to(device=position_ids.device, dtype=torch.int32)
    else:
        starts = (position_ids.reshape(-1) == 0).nonzero().flatten()
        cu = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    if int(cu[0]) != 0:
        cu = torch.cat([cu.new_zeros(1), cu])
    if int(cu[-1]) < total:  # trailing padding becomes its own segment
        cu = torch.cat([cu, cu.new_tensor([total])])
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the packed row has {total} tokens")
    max_len = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


class ViQMLLM(nn.Module):
    """Qwen2ForCausalLM (vocabulary already extended) + CodeMerger.

    `forward(batch)` takes the packed batch of `data.packing` (input_ids, labels unshifted with
    -100 for unsupervised tokens, position_ids restarting per sample, cu_seqlens, codes) and
    returns {'loss_sum': fp32 sum of token cross-entropies, 'n_supervised': token count}; the
    trainer divides by the global count across micro-batches and ranks.
    """

    def __init__(
        self,
        llm: Qwen2ForCausalLM,
        vocab: CodeVocab,
        *,
        loss_chunk_size: int = 1024,
        checkpoint_loss_chunks: bool = True,
        loss_impl: str = "chunked",
        gathered: Callable = no_gather,
    ):
        super().__init__()
        rows = llm.get_input_embeddings().num_embeddings
        if rows != vocab.total_rows:
            raise ValueError(
                f"LLM embedding has {rows} rows, CodeVocab needs {vocab.total_rows}: call extend_vocabulary(llm, vocab) first"
            )
        self.llm = llm
        self.vocab = vocab
        self.loss_chunk_size = loss_chunk_size
        self.checkpoint_loss_chunks = checkpoint_loss_chunks
        if loss_impl not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"unknown loss_impl {loss_impl!r}; valid: {', '.join(LOSS_IMPLEMENTATIONS)}")
        self.loss_impl = loss_impl
        # Context factory for reading whole parameters (deepspeed.zero.GatheredParameters under ZeRO-3).
        self.gathered = gathered
        if loss_impl == "fused":
            use_fused_loss_head(llm)
        table = next(llm.get_input_embeddings().parameters())  # nn.Embedding.weight or SplitEmbedding.text_rows
        self.merger = CodeMerger(llm.config.hidden_size).to(device=table.device, dtype=table.dtype)

    @property
    def decoder_layer_class(self) -> type[nn.Module]:
        """The transformer block class, for activation checkpointing / wrapping decided outside."""
        return type(self.llm.model.layers[0])

    @property
    def config(self):
        return self.llm.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, fraction: float = 1.0) -> int:
        """HF activation checkpointing (non-reentrant unless told otherwise) of `fraction` of the
        decoder layers, spread evenly over the depth; returns how many layers recompute.

        Selective checkpointing trades memory for speed: each layer left out keeps its
        activations and skips one forward recomputation in backward.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"checkpointing fraction must be in [0, 1], got {fraction}")
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        layers = self.llm.model.layers
        chosen = checkpointed_layer_indices(len(layers), fraction)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i in chosen  # the flag HF's checkpointing layer reads per call
        return len(chosen)

    def unsupported_settings(self, cfg) -> dict[str, str]:
        """Every training setting applies to the MLLM (mllm.contract.TrainableModel)."""
        return {}

    def compile_decoder_layers(self, **compile_kwargs) -> int:
        """torch.compile each decoder layer in place (fuses RMSNorm, RoPE, SwiGLU and the residual
        adds); the embedding, the mask construction and the loss stay eager. Returns the count."""
        for layer in self.llm.model.layers:
            layer.compile(**compile_kwargs)
        return len(self.llm.model.layers)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.llm, "activation_checkpointing_disable"):
            self.llm.activation_checkpointing_disable()
        else:
            self.llm.gradient_checkpointing_disable()

    # -- split vocabulary tables ------------------------------------------------------------------

    @property
    def code_rows_split(self) -> bool:
        """True while the embedding (and head) are SplitEmbedding / SplitHead (see split_code_rows)."""
        return tables_split(self.llm)

    def split_code_rows(self) -> None:
        """Store the embedding and the output head as text rows [0, code_base) + code rows [code_base, total_rows).

        Values are copied exactly; a tied model's head uses the embedding's two Parameters. Call it
        before deepspeed.initialize (under ZeRO-3: inside the partitioning context, with `gathered`
        given to the constructor). Loss, generation and export
        behave as before; save_export writes the standard merged layout. No-op when already split.
        """
        split_tables(self.llm, self.vocab, self.gathered)

    def merge_code_rows(self) -> None:
        """Inverse of split_code_rows: a plain nn.Embedding / bias-free nn.Linear of total_rows (re-tied when tied)."""
        merge_tables(self.llm)
        if self.loss_impl == "fused":
            use_fused_loss_head(self.llm)

    # -- inputs -------------------------------------------------------------------------------

    def _check_image_rows(self, image_mask: torch.Tensor, rows: int, what: str, count=None) -> None:
        n_pad = int(image_mask.sum()) if count is None else count
        if n_pad != rows:
            raise ValueError(
                f"input_ids hold {n_pad} image_pad positions (id {self.vocab.image_pad_id}) but {what} has {rows} rows; "
                f"{what} needs exactly one row per image_pad position, in order"
            )

    def _check_codes(self, image_mask: torch.Tensor, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != SUBCODES:
            raise ValueError(f"codes must have shape [M, {SUBCODES}] (one row per image_pad position); got {tuple(codes.shape)}")
        m = codes.shape[0]
        if m:  # one host sync for the count and the id range together
            n_pad, low, high = torch.stack([image_mask.sum(), codes.min(), codes.max()]).tolist()
        else:
            n_pad, low, high = int(image_mask.sum()), None, None
        self._check_image_rows(image_mask, m, "codes", count=n_pad)
        if m and (low < self.vocab.code_base or high >= self.vocab.row_end_id):
            raise ValueError(
                f"codes must be extended-vocabulary ids in [{self.vocab.code_base}, {self.vocab.row_end_id}) "
                f"(FSQ index + CodeVocab.code_base); got min {low}, max {high}"
            )

    def embed_inputs(self, input_ids: torch.Tensor, codes: torch.Tensor | None = None,
                     image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids + the image positions' inputs -> [B, T, H] input vectors.

        The image_pad positions take either `codes` ([M, 4] extended-vocabulary ids: the four
        sub-code embeddings merged by the CodeMerger) or `image_embeds` ([M, H] continuous
        vectors, e.g. ViT features through a projector while the tokenizer itself trains, or a
        continuous encoder in the throughput comparison). On the codes path the merger runs on
        every call, on a zero-row input when the batch has no image, so each rank executes the
        same modules every step (ZeRO-3 hangs otherwise).
        """
        image_mask = input_ids == self.vocab.image_pad_id
        if image_embeds is not None:
            if codes is not None:
                raise ValueError("the image positions take codes or image_embeds, not both")
            self._check_image_rows(image_mask, image_embeds.shape[0], "image_embeds")
            text = self.llm.get_input_embeddings()(input_ids)
            return text.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(text.dtype))
        if codes is None:
            codes = input_ids.new_zeros((0, SUBCODES))
        codes = codes.to(device=input_ids.device, dtype=torch.long)
        self._check_codes(image_mask, codes)
        # One embedding call for text and code ids: a ZeRO-3 gather per step, not two.
        vectors = self.llm.get_input_embeddings()(torch.cat([input_ids.reshape(-1), codes.reshape(-1)]))
        n_tokens = input_ids.numel()
        text = vectors[:n_tokens].view(*input_ids.shape, -1)
        merged = self.merger(vectors[n_tokens:].view(codes.shape[0], SUBCODES, vectors.shape[-1]))
        return text.masked_scatter(image_mask.unsqueeze(-1), merged.to(text.dtype))

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Final-norm hidden states [B, T, H] of a packed batch (no KV cache, no dense host mask).

        The one LLM forward of the project: MLLM training on codes, tokenizer training and the
        continuous-encoder arms of the throughput benchmark all come through here (`codes` or
        `image_embeds` in the batch), so every attention backend's packing applies to each.
        """
        input_ids = batch["input_ids"]
        b, t = input_ids.shape
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        position_ids = position_ids.to(input_ids.device)
        inputs_embeds = self.embed_inputs(input_ids, batch.get("codes"), batch.get("image_embeds"))
        extra = {}
        if self.llm.config._attn_implementation == "flash_attention_2":
            # flash-attn detects packing only in a single row: flatten and pass cu_seqlens directly.
            extra = _varlen_kwargs(position_ids, batch.get("cu_seqlens"))
            inputs_embeds = inputs_embeds.reshape(1, b * t, -1)
            position_ids = position_ids.reshape(1, b * t)
        out = self.llm.model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=None, use_cache=False, **extra
        )
        return out.last_hidden_state.view(b, t, -1)

    # -- loss ---------------------------------------------------------------------------------

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 sum of CE over supervised tokens, their count); logits exist one chunk at a time."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
        supervised = targets != IGNORE_INDEX
        # Only supervised positions reach the head: most of a multimodal pack (image tokens, prompts) never does.
        hidden, targets = hidden[supervised], targets[supervised]
        head = self.llm.get_output_embeddings()
        if self.loss_impl == "fused":  # inside the head's forward, where ZeRO-3 gathers its weight
            loss_sum = head(hidden, targets=targets, chunk_size=self.loss_chunk_size)
        else:
            loss_sum = chunked_linear_cross_entropy(hidden, head, targets, self.loss_chunk_size, self.checkpoint_loss_chunks)
        return loss_sum, supervised.sum()

    def forward(self, batch: dict, *, return_logits: bool = False) -> dict:
        hidden = self.hidden_states(batch)
        out = {}
        if batch.get("labels") is not None:
            out["loss_sum"], out["n_supervised"] = self.loss_from_hidden(hidden, batch["labels"].to(hidden.device))
        if return_logits:
            out["logits"] = self.llm.get_output_embeddings()(hidden)
        return out

    def per_sample_losses(self, batch: dict) -> list[tuple[torch.Tensor, int]]:
        """(loss_sum, supervised count) for every packed sample, in row-major order.

        Samples are delimited by `cu_seqlens` for a single row, else by position_ids restarting
        at 0 (each row starts a sample).
        """
        hidden = self.hidden_states(batch)
        labels = batch["labels"].to(hidden.device)
        b, t = labels.shape
        if batch.get("cu_seqlens") is not None and b == 1:
            starts = torch.zeros((1, t), dtype=torch.bool, device=hidden.device)
            starts[0, batch["cu_seqlens"][:-1].long().to(hidden.device)] = True
        else:
            position_ids = batch.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(t, device=hidden.device).expand(b, t)
            starts = position_ids.to(hidden.device) == 0
        starts[:, 0] = True
        sample_ids = starts.long().cumsum(-1) - 1
        sample_ids = sample_ids + (starts.long().sum(-1).cumsum(0) - starts.long().sum(-1)).unsqueeze(-1)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        logits = self.llm.get_output_embeddings()(hidden).float()
        token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        supervised = targets.flatten() != IGNORE_INDEX
        flat_ids = sample_ids.flatten()
        results = []
        for sample in range(int(flat_ids.max()) + 1):
            mine = flat_ids == sample
            results.append((token_loss[mine].sum(), int((supervised & mine).sum())))
        return results

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate_from_codes(
        self,
        prompts: Sequence[tuple[torch.Tensor, torch.Tensor]],
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int | None = None,
    ) -> list[list[int]]:
        """Batched greedy decoding with a KV cache; one list of new token ids per prompt, eos excluded.

        prompts: (input_ids LongTensor[L], codes LongTensor[M, 4]) pairs, the codes being the
        extended-vocabulary ids of the prompt's M image_pad positions. Prompts are left-padded and
        masked, so each result equals decoding that prompt alone.
        """
        if not prompts:
            return []
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = eos_ids[0] if pad_token_id is None else pad_token_id
        if pad == self.vocab.image_pad_id:
            raise ValueError(f"pad_token_id {pad} is the image_pad id; pick another padding id (e.g. eos)")
        device = self.merger.weight.device
        longest = max(int(ids.numel()) for ids, _ in prompts)
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
        for row, (ids, _) in enumerate(prompts):
            n = int(ids.numel())
            input_ids[row, longest - n :] = ids.to(device).reshape(-1)
            attention_mask[row, longest - n :] = 1
        codes = torch.cat([c.reshape(-1, SUBCODES).to(device=device, dtype=torch.long) for _, c in prompts])
        inputs_embeds = self.embed_inputs(input_ids, codes)
        # Explicit neutral values: a checkpoint's generation_config.json (e.g. repetition_penalty 1.05)
        # would otherwise fill in whatever is left unset.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=eos_ids,
            pad_token_id=pad,
        )
        out = self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=config)
        results = []
        for row in out.tolist():
            cut = next((i for i, tok in enumerate(row) if tok in eos_ids), len(row))
            results.append(row[:cut])
        return results


def build_mllm(
    llm_name_or_path: str,
    vocab: CodeVocab,
    *,
    attn_implementation: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    init: str = "mean",
    codebook_features: torch.Tensor | None = None,
    noise_std: float = 0.05,
    seed: int = 0,
    gathered: Callable = no_gather,
    loss_chunk_size: int = 1024,
    loss_impl: str = "chunked",
    **config_overrides,
) -> ViQMLLM:
    """build_llm + extend_vocabulary + ViQMLLM: the training starting point (seed torch before a preset)."""
    llm = build_llm(
        llm_name_or_path, attn_implementation=attn_implementation, dtype=dtype, device=device, **config_overrides
    )
    extend_vocabulary(
        llm, vocab, init=init, codebook_features=codebook_features, noise_std=noise_std, seed=seed, gathered=gathered
    )
    return ViQMLLM(llm, vocab, loss_chunk_size=loss_chunk_size, loss_impl=loss_impl, gathered=gathered)
