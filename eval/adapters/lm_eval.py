"""The LLM of a ViQ-MLLM export as an lm-evaluation-harness model ("viq-mllm"), text only.

Text benchmarks check that extending the vocabulary with image codes and training on them
did not hurt the language model: run the same tasks on the export and on the base Qwen2.5
checkpoint (lm-eval's `hf` model) and compare.

    python -m eval.adapters.lm_eval --model viq-mllm \\
        --model_args pretrained=runs/viq-0.5b/hf,dtype=bf16 --tasks hellaswag,arc_easy --batch_size 16

lm-eval finds models only through its registry, filled when a module registers one; it has no
plug-in discovery, so `lm_eval --model viq-mllm` alone cannot see this model. The command above
registers it and hands the rest of the command line to lm-eval's own CLI (the arguments are
lm-eval's); from Python, `import eval.adapters.lm_eval` before
`lm_eval.simple_evaluate(model='viq-mllm', model_args='pretrained=...')`.

Model arguments: pretrained (the export), dtype (auto = the export's, float32/bfloat16/float16
or fp32/bf16/fp16), max_length, max_gen_toks, and lm-eval's batch_size, max_batch_size and
device (a CUDA device on a machine without CUDA falls back to the CPU, as for `hf`). Any other
argument is an error naming the valid ones.

What the three request types compute (the conventions of lm-eval's `hf` model on the same
export, so that the numbers are comparable with it):
- loglikelihood(context, continuation): trailing spaces of the context move to the
  continuation; the continuation's ids are those of tokenize(context + continuation) past
  tokenize(context); an empty context becomes the prefix token (bos, else eos) unless the
  continuation itself starts with that token, which is then the context. The sum of the
  continuation's log-probabilities and whether greedy decoding would have produced it, with the
  input cut from the left to `max_length`. The softmax runs over every row of the extended
  vocabulary, code ids included: that is the distribution the model samples from.
- loglikelihood_rolling(text): disjoint windows of at most `max_length` predicted tokens,
  the first conditioned on the prefix token, each later one on the tokens before it that
  still fit (lm-eval's `hf` model with context length 1), summed.
- generate_until(context, {until, max_gen_toks}): the LLM's own `generate` on the tokenised
  context (an `<|image_pad|>` in the text is an ordinary token here, as for `hf`), greedy,
  batched like `hf` (same order, left padding), decoded without special tokens and cut at the
  first stop string or the end-of-text token. Sampling arguments are ignored: evaluation here
  is greedy.
"""
from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from viq.dtypes import DTYPES, default_device
from mllm.export import load_export

try:
    # lm-eval fills its registry with its own models only while the registry is empty, so they
    # must be registered before ours or `hf` & co. disappear from any process that imports this.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM as _LMEvalLM
    from lm_eval.api.registry import register_model as _register_model
except Exception as _error:   # not installed, or broken: the adapter is unusable, the module is not
    _LMEvalLM = None
    _IMPORT_ERROR: Exception | None = _error
else:
    _IMPORT_ERROR = None

MODEL_NAME = 'viq-mllm'
MISSING_LM_EVAL = ("eval.adapters.lm_eval needs lm-evaluation-harness (the `lm_eval` package): pip install lm_eval "
                   "(./dev.sh installs the pinned version)")
MODEL_ARGUMENTS = ('pretrained', 'dtype', 'max_length', 'max_gen_toks', 'batch_size', 'max_batch_size', 'device')
DEFAULT_MAX_GEN_TOKS = 256   # lm-eval's default
_GEN_TOKS_ALIASES = ('max_gen_toks', 'max_new_tokens', 'max_tokens', 'max_completion_tokens')
logger = logging.getLogger(__name__)


class ModelArgumentError(ValueError):
    """A model argument lm-eval passed that this model cannot use; the message is one line."""


# --------------------------------------------------------------------------- core computations


def prefix_token_id(tokenizer) -> int:
    """lm-eval's prefix for an empty context: bos when the tokenizer has one, else eos."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval's hf model splits a request."""
    if context == '':
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:   # it already starts with the prefix token
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_logprobs(llm, pairs: Sequence[tuple[list[int], list[int]]], max_length: int,
                          batch_size: int = 8, pad_token_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy?) per pair, computed as lm-eval's `hf` model does.

    The model input is (context + continuation)[-(max_length + 1):][:-1]; its last
    len(continuation) positions score the continuation. Batching follows `hf` so that the floats
    match it: pairs with the same context + continuation[:-1] share one forward pass (the one
    with the longest continuation), longest inputs first (ties by token ids), right padding and
    no attention mask (causal attention never looks at the padding after a row), log-softmax in
    fp32 over the extended vocabulary.
    """
    device = llm.get_input_embeddings().weight.device
    groups: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f'request {i}: empty continuation; lm-eval never asks for one')
        if len(continuation) > max_length:
            raise ValueError(f'request {i}: continuation of {len(continuation)} tokens exceeds max_length {max_length}')
        groups.setdefault(tuple(context) + tuple(continuation[:-1]), []).append(i)
    leaders = [max(members, key=lambda i: len(pairs[i][1])) for members in groups.values()]
    members_of = {leader: members for leader, members in zip(leaders, groups.values())}
    leaders.sort(key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), tuple(pairs[i][0]) + tuple(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(leaders), batch_size):
        chunk = leaders[start:start + batch_size]
        inputs = [(list(pairs[i][0]) + list(pairs[i][1]))[-(max_length + 1):][:-1] for i in chunk]
        input_ids = torch.full((len(chunk), max(len(x) for x in inputs)), pad_token_id, dtype=torch.long, device=device)
        for row, ids in enumerate(inputs):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        scores = F.log_softmax(llm(input_ids=input_ids, use_cache=False).logits, dim=-1, dtype=torch.float32)
        for row, leader in enumerate(chunk):
            end = len(inputs[row])
            positions = scores[row, end - len(pairs[leader][1]):end]
            greedy = positions.argmax(-1)
            for i in members_of[leader]:
                continuation = torch.tensor(pairs[i][1], dtype=torch.long, device=device)
                tail = positions[-len(continuation):]
                results[i] = (float(tail.gather(-1, continuation[:, None]).sum()),
                              bool(torch.equal(greedy[-len(continuation):], continuation)))
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


def resolve_device(device: str | None) -> str:
    """The requested device if this machine has it, else CUDA when available, else the CPU (as `hf`)."""
    if device is None:
        return default_device()
    name = str(device)
    if name == 'cpu' or name.startswith('mps'):
        return name
    if name.startswith('cuda') and torch.cuda.is_available():
        index = name.partition(':')[2]
        if not index or (index.isdigit() and int(index) < torch.cuda.device_count()):
            return name
    fallback = default_device()
    logger.warning('device %r is not available here; using %r', name, fallback)
    return fallback


def resolve_dtype(name, export_dir: str | Path) -> torch.dtype:
    """'auto' (lm-eval's default for `hf`): the dtype the export was saved in; else a DTYPES name."""
    if name is None or isinstance(name, torch.dtype):
        return name if name is not None else torch.float32
    if name == 'auto':
        config = json.loads((Path(export_dir) / 'config.json').read_text())
        saved = str(config.get('dtype') or config.get('torch_dtype') or 'float32')
        return DTYPES.get(saved, torch.float32)
    if name not in DTYPES:
        raise ModelArgumentError(f"viq-mllm: dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _max_gen_toks(kwargs: dict, default: int) -> int:
    for alias in _GEN_TOKS_ALIASES:
        if kwargs.get(alias) is not None:
            return int(kwargs[alias])
    return default


# --------------------------------------------------------------------------- the lm-eval model


class ExportTextModel:
    """The parts of an export lm-eval requests need, without the ViQ tokenizer."""

    def __init__(self, pretrained: str, device: str | None, dtype: str | None, batch_size, max_length,
                 max_gen_toks: int):
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.vocab = load_export(pretrained, device=self.device,
                                                             dtype=resolve_dtype(dtype, pretrained))
        if self.tokenizer is None:
            raise ModelArgumentError(f'viq-mllm: {pretrained}: the export has no tokenizer files; re-export it with '
                                     f'a tokenizer')
        if self.tokenizer.pad_token_id is None:   # lm-eval's configure_pad_token for tokenizers without one
            self.tokenizer.pad_token_id = self.tokenizer.eos_token_id
        self.pretrained = str(pretrained)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8   # 'auto' -> a fixed size
        self.max_length = int(max_length) if max_length else int(self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)

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

    @torch.no_grad()
    def _generate_batch(self, contexts: list[str], max_new: int, until: list[str]) -> list[str]:
        tokenizer = self.tokenizer
        previous_side, tokenizer.padding_side = tokenizer.padding_side, 'left'
        try:
            encoded = tokenizer(contexts, padding='longest', return_tensors='pt')
        finally:
            tokenizer.padding_side = previous_side
        budget = self.max_length - max_new
        if budget <= 0:
            raise ValueError(f'max_gen_toks {max_new} leaves no room for the context in max_length {self.max_length}')
        input_ids = encoded['input_ids'][:, -budget:].to(self.device)
        attention_mask = encoded['attention_mask'][:, -budget:].to(self.device)
        # The LLM's own generation config applies, as for `hf`; greedy, whatever it says about sampling.
        out = self.model.llm.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_length=input_ids.shape[1] + max_new, pad_token_id=tokenizer.pad_token_id,
                                      stop_strings=[u for u in until if u] or None, tokenizer=tokenizer, use_cache=True)
        texts = []
        for row in out[:, input_ids.shape[1]:].tolist():
            texts.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), until))
        return texts

    def generate_until(self, args: Sequence[tuple[str, dict]]) -> list[str]:
        """Grouped by generation arguments, longest context first, batches of batch_size (lm-eval's order)."""
        eos = self.tokenizer.decode([self.tokenizer.eos_token_id])
        groups: dict[str, list[int]] = {}
        for n, (_, kwargs) in enumerate(args):
            groups.setdefault(json.dumps(kwargs or {}, sort_keys=True, default=str), []).append(n)
        results: list[str | None] = [None] * len(args)
        for members in groups.values():
            kwargs = dict(args[members[0]][1] or {})
            until = kwargs.get('until') or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            max_new = _max_gen_toks(kwargs, self.max_gen_toks)
            order = sorted(members, key=lambda n: (-len(self.tokenizer.encode(args[n][0])), args[n][0]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for n, text in zip(chunk, self._generate_batch([args[n][0] for n in chunk], max_new, until)):
                    results[n] = text
        return results


if _LMEvalLM is not None:

    @_register_model(MODEL_NAME)
    class ViQMLLMLM(_LMEvalLM):
        """lm-eval model over the LLM of a ViQ-MLLM export (model arguments: see the module docstring)."""

        def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = 'auto',
                     batch_size=8, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                     max_batch_size=None, **unknown):
            super().__init__()
            if unknown:
                name = sorted(unknown)[0]
                raise ModelArgumentError(f"viq-mllm: unknown model argument {name!r}; valid: {', '.join(MODEL_ARGUMENTS)}")
            if not pretrained:
                raise ModelArgumentError('viq-mllm: model argument pretrained=<export directory> is required')
            self.text_model = ExportTextModel(pretrained, device, dtype, batch_size, max_length, max_gen_toks)

        @property
        def tokenizer_name(self) -> str:
            return self.text_model.pretrained.replace('/', '__')

        def chat_template(self, chat_template=False) -> str:
            return self.text_model.tokenizer.chat_template or '' if chat_template else ''

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            """As `hf`: without a generation prompt the last (assistant) message is continued, so a
            task's assistant prefill ends the prompt instead of a closed turn."""
            import jinja2

            tokenizer = self.text_model.tokenizer
            for history in (chat_history, [m for m in chat_history if m['role'] != 'system']):
                try:
                    return tokenizer.apply_chat_template(history, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt,
                                                         continue_final_message=not add_generation_prompt)
                except jinja2.exceptions.TemplateError:
                    if history is not chat_history:
                        raise
                    logger.warning('chat template failed; retrying without the system message, as lm-eval does')

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.text_model.loglikelihood([request.args for request in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.text_model.loglikelihood_rolling([request.args[0] for request in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.text_model.generate_until([request.args for request in requests])

else:

    class ViQMLLMLM:
        """Placeholder: lm-eval is not installed (see MISSING_LM_EVAL)."""

        def __init__(self, *args, **kwargs):
            raise ImportError(f'{MISSING_LM_EVAL} ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})') from _IMPORT_ERROR


def main(argv=None) -> int:
    """Register "viq-mllm", then run lm-eval's command line with the remaining arguments."""
    if _LMEvalLM is None:
        print(f'error: {MISSING_LM_EVAL}', file=sys.stderr)
        return 2
    sys.argv = ['lm_eval'] + list(sys.argv[1:] if argv is None else argv)
    try:
        runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)
    except ModelArgumentError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    return 0


__all__ = ['MODEL_ARGUMENTS', 'MODEL_NAME', 'MISSING_LM_EVAL', 'ExportTextModel', 'ModelArgumentError', 'ViQMLLMLM',
           'continuation_logprobs', 'cut_at_stop', 'encode_pair', 'prefix_token_id', 'resolve_device', 'resolve_dtype',
           'rolling_windows']

if __name__ == '__main__':
    sys.exit(main())
