"""The LLM of a ViQ-MLLM export as an lm-evaluation-harness model ("viq-mllm"), text only.

Text benchmarks check that extending the vocabulary with image codes and training on them
did not hurt the language model: run the same tasks on the export and on the base Qwen2.5
checkpoint (lm-eval's `hf` model) and compare.

    pip install lm_eval        # not a dependency of this project
    python -m eval.adapters.lm_eval --model viq-mllm \\
        --model_args pretrained=runs/viq-0.5b/hf,dtype=bf16 --tasks hellaswag,arc_easy --batch_size 16

`python -m eval.adapters.lm_eval` registers the model and hands the rest of the command line
to lm-eval's own CLI; from Python, `import eval.adapters.lm_eval` before
`lm_eval.simple_evaluate(model='viq-mllm', model_args='pretrained=...')`.

What the three request types compute (the conventions of lm-eval's `hf` model, so numbers are
comparable with it):
- loglikelihood(context, continuation): trailing spaces of the context move to the
  continuation; the continuation's ids are those of tokenize(context + continuation) past
  tokenize(context); an empty context becomes the prefix token (bos, else eos). The sum of
  the continuation's log-probabilities and whether greedy decoding would have produced it,
  with the input cut from the left to `max_length`. The softmax runs over every row of the
  extended vocabulary, code ids included: that is the distribution the model samples from.
- loglikelihood_rolling(text): disjoint windows of at most `max_length` predicted tokens,
  the first conditioned on the prefix token, each later one on the tokens before it that
  still fit (lm-eval's `hf` model with context length 1), summed.
- generate_until(context, {until, max_gen_toks}): greedy decoding, cut at the first stop
  string. Sampling arguments are ignored: evaluation here is greedy.
"""
from __future__ import annotations

import runpy
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from data.vocab import ENDOFTEXT_ID, IM_END_ID, SUBCODES
from eval.generate import default_device, parse_dtype
from mllm.export import load_export

try:
    from lm_eval.api.model import LM as _LMEvalLM
    from lm_eval.api.registry import register_model as _register_model
except ImportError as _error:   # lm-eval not installed: the adapter is unusable, the module is not
    _LMEvalLM = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

MODEL_NAME = 'viq-mllm'
MISSING_LM_EVAL = ("eval.adapters.lm_eval needs lm-evaluation-harness (the `lm_eval` package): pip install lm_eval; "
                   "it is not a dependency of this project")


# --------------------------------------------------------------------------- core computations


def prefix_token_id(tokenizer) -> int:
    """lm-eval's prefix for an empty context: bos when the tokenizer has one, else eos."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval's hf model splits a request."""
    if context == '':
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_logprobs(llm, pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                          batch_size: int = 8, pad_token_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy?) per pair, batched with right padding.

    The model input is (context + continuation)[-(max_length + 1):][:-1]; the last
    len(continuation) logits score the continuation.
    """
    device = llm.get_input_embeddings().weight.device
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = []
        for i in chunk:
            context, continuation = pairs[i]
            if not continuation:
                raise ValueError(f'request {i}: empty continuation; lm-eval never asks for one')
            if len(continuation) > max_length:
                raise ValueError(f'request {i}: continuation of {len(continuation)} tokens exceeds max_length {max_length}')
            inputs.append((list(context) + list(continuation))[-(max_length + 1):][:-1])
        longest = max(len(x) for x in inputs)
        input_ids = torch.full((len(chunk), longest), pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(chunk), longest), dtype=torch.long, device=device)
        for row, ids in enumerate(inputs):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        logits = llm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        for row, i in enumerate(chunk):
            continuation = torch.tensor(pairs[i][1], dtype=torch.long, device=device)
            end = len(inputs[row])
            scores = F.log_softmax(logits[row, end - len(continuation):end].float(), dim=-1)
            logprob = scores.gather(-1, continuation[:, None]).sum().item()
            results[i] = (logprob, bool(torch.equal(scores.argmax(-1), continuation)))
    return results


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering `tokens` once, each scoreable in max_length.

    The first window predicts up to max_length tokens from the prefix token; every later one
    predicts up to max_length tokens from as many preceding tokens as still fit in
    max_length + 1 (one for a full window, more for the shorter last one), as lm-eval does.
    """
    if max_length < 1:
        raise ValueError(f'max_length must be >= 1, got {max_length}')
    tokens = list(tokens)
    windows = []
    predicted = 0
    while predicted < len(tokens):
        end = min(predicted + max_length, len(tokens))
        context = [prefix_token] if predicted == 0 else tokens[end - max_length - 1:predicted]
        windows.append((context, tokens[predicted:end]))
        predicted = end
    return windows


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


def greedy_text(model, tokenizer, contexts: Sequence[str], max_new_tokens: int, max_length: int,
                eos_token_ids: list[int], batch_size: int = 8) -> list[str]:
    """Greedy continuations of plain-text contexts (no chat template, no images), batched."""
    device = model.llm.get_input_embeddings().weight.device
    budget = max(1, max_length - max_new_tokens)
    encoded = [tokenizer.encode(c, add_special_tokens=False)[-budget:] or [prefix_token_id(tokenizer)] for c in contexts]
    order = sorted(range(len(contexts)), key=lambda i: -len(encoded[i]))
    text_rows = model.vocab.text_vocab_size
    outputs: list[str | None] = [None] * len(contexts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        prompts = [(torch.tensor(encoded[i], dtype=torch.long, device=device),
                    torch.zeros((0, SUBCODES), dtype=torch.long)) for i in chunk]
        generated = model.generate_from_codes(prompts, max_new_tokens, eos_token_id=eos_token_ids)
        for i, ids in zip(chunk, generated):
            outputs[i] = tokenizer.decode([t for t in ids if t < text_rows], skip_special_tokens=True)
    return outputs


# --------------------------------------------------------------------------- the lm-eval model


class ExportTextModel:
    """The parts of an export lm-eval requests need, without the ViQ tokenizer."""

    def __init__(self, pretrained: str, device: str | None, dtype: str | None, batch_size, max_length,
                 max_gen_toks: int):
        self.device = device or default_device()
        self.model, self.tokenizer, self.vocab = load_export(pretrained, device=self.device,
                                                             dtype=parse_dtype(dtype, self.device))
        if self.tokenizer is None:
            raise ValueError(f'{pretrained}: the export has no tokenizer files; re-export it with a tokenizer')
        self.pretrained = str(pretrained)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8   # 'auto' -> a fixed size
        self.max_length = int(max_length) if max_length else int(self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.eos_token_ids = sorted({IM_END_ID, ENDOFTEXT_ID, int(self.tokenizer.eos_token_id)})

    def loglikelihood(self, args: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, context, continuation) for context, continuation in args]
        return continuation_logprobs(self.model.llm, pairs, self.max_length, self.batch_size)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        prefix = prefix_token_id(self.tokenizer)
        windows, owner = [], []
        for n, text in enumerate(texts):
            for window in rolling_windows(self.tokenizer.encode(text, add_special_tokens=False), prefix, self.max_length):
                windows.append(window)
                owner.append(n)
        totals = [0.0] * len(texts)
        for n, (logprob, _) in zip(owner, continuation_logprobs(self.model.llm, windows, self.max_length,
                                                                 self.batch_size)):
            totals[n] += logprob
        return totals

    def generate_until(self, args: Sequence[tuple[str, dict]]) -> list[str]:
        results: list[str | None] = [None] * len(args)
        groups: dict[int, list[int]] = {}
        for n, (_, kwargs) in enumerate(args):
            groups.setdefault(int((kwargs or {}).get('max_gen_toks', self.max_gen_toks)), []).append(n)
        for max_new, members in groups.items():
            texts = greedy_text(self.model, self.tokenizer, [args[n][0] for n in members], max_new, self.max_length,
                                self.eos_token_ids, self.batch_size)
            for n, text in zip(members, texts):
                until = (args[n][1] or {}).get('until') or []
                results[n] = cut_at_stop(text, [until] if isinstance(until, str) else until)
        return results


if _LMEvalLM is not None:

    @_register_model(MODEL_NAME)
    class ViQMLLMLM(_LMEvalLM):
        """lm-eval model over the LLM of a ViQ-MLLM export (model_args: pretrained, dtype, max_length,
        max_gen_toks; batch_size and device come from lm-eval's own flags)."""

        def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None, batch_size=8,
                     max_length: int | None = None, max_gen_toks: int = 256, **kwargs):
            super().__init__()
            self.text_model = ExportTextModel(pretrained, device, dtype, batch_size, max_length, max_gen_toks)

        @property
        def tokenizer_name(self) -> str:
            return self.text_model.pretrained

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return self.text_model.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

        def loglikelihood(self, requests):
            return self.text_model.loglikelihood([request.args for request in requests])

        def loglikelihood_rolling(self, requests):
            return self.text_model.loglikelihood_rolling([request.args[0] for request in requests])

        def generate_until(self, requests):
            return self.text_model.generate_until([request.args for request in requests])

else:

    class ViQMLLMLM:
        """Placeholder: lm-eval is not installed (see MISSING_LM_EVAL)."""

        def __init__(self, *args, **kwargs):
            raise ImportError(MISSING_LM_EVAL) from _IMPORT_ERROR


def main(argv=None) -> int:
    """Register "viq-mllm", then run lm-eval's command line with the remaining arguments."""
    if _LMEvalLM is None:
        print(f'error: {MISSING_LM_EVAL}', file=sys.stderr)
        return 2
    sys.argv = ['lm_eval'] + list(sys.argv[1:] if argv is None else argv)
    runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)
    return 0


__all__ = ['MODEL_NAME', 'MISSING_LM_EVAL', 'ExportTextModel', 'ViQMLLMLM', 'continuation_logprobs', 'cut_at_stop',
           'encode_pair', 'greedy_text', 'prefix_token_id', 'rolling_windows']

if __name__ == '__main__':
    sys.exit(main())
