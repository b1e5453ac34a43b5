"""A ViQ-MLLM export as a VLMEvalKit model, to run VLMEvalKit's own `run.py` on it.

VLMEvalKit is not a dependency of this project; install it yourself (`pip install -e .` in a
VLMEvalKit checkout) and put this repository on `PYTHONPATH`. Then register the export in
VLMEvalKit's `vlmeval/config.py`, next to the other entries of `supported_VLM`:

    from functools import partial
    from eval.adapters.vlmevalkit import ViQMLLMVLMEval

    supported_VLM['ViQ-MLLM-0.5B'] = partial(ViQMLLMVLMEval, model_path='/abs/path/runs/viq-0.5b/hf',
                                             max_new_tokens=64)

and run, from the VLMEvalKit checkout:

    python run.py --data MMStar OCRBench --model ViQ-MLLM-0.5B --judge exact_matching
    torchrun --nproc-per-node 8 run.py --data DocVQA_VAL --model ViQ-MLLM-0.5B

`use_custom_prompt` is False, so VLMEvalKit builds the prompts with its dataset classes
(which `eval/benchmarks` reproduce) and the model answers them exactly as `python -m
eval.run` does: the same message-to-chat translation, the same greedy decoding
(`eval.generate.MLLMGenerator`). Without VLMEvalKit installed this module still imports;
constructing `ViQMLLMVLMEval` then raises an ImportError that says what to install.
"""
from __future__ import annotations

import os

from eval.generate import DEFAULT_MAX_NEW_TOKENS, MLLMGenerator

try:
    from vlmeval.vlm.base import BaseModel as _VLMEvalBaseModel
except ImportError as _error:   # VLMEvalKit not installed: the adapter is unusable, the module is not
    _VLMEvalBaseModel = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

MISSING_VLMEVAL = ('eval.adapters.vlmevalkit needs VLMEvalKit (the `vlmeval` package): install it from '
                   'https://github.com/open-compass/VLMEvalKit (pip install -e . in a checkout); '
                   'python -m eval.run evaluates without it')


def as_message_list(message) -> list[dict]:
    """VLMEvalKit's accepted inputs -> [{'type', 'value'}, ...]: dicts pass through; a plain string
    is an image when it names an existing file (VLMEvalKit's rule for string lists), else text."""
    if isinstance(message, (str, dict)):
        message = [message]
    items = []
    for item in message:
        if isinstance(item, dict):
            items.append(item)
        elif isinstance(item, str):
            items.append({'type': 'image' if os.path.isfile(item) else 'text', 'value': item})
        else:
            raise ValueError(f'message item {item!r:.60}: expected a dict with type/value or a string')
    return items


def answer_message(generator: MLLMGenerator, message, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    """The model's greedy answer to one VLMEvalKit message (what generate_inner returns)."""
    return generator.generate([as_message_list(message)], max_new_tokens=max_new_tokens, batch_size=1)[0]


if _VLMEvalBaseModel is not None:

    class ViQMLLMVLMEval(_VLMEvalBaseModel):
        """VLMEvalKit model: interleaved images and text, greedy decoding, no custom prompts."""

        INTERLEAVE = True
        allowed_types = ['text', 'image']

        def __init__(self, model_path: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, device: str | None = None,
                     dtype: str | None = None, system: str | None = None, **kwargs):
            super().__init__()
            if kwargs:
                raise TypeError(f'ViQMLLMVLMEval got unknown arguments {sorted(kwargs)}; valid: model_path, '
                                f'max_new_tokens, device, dtype, system')
            if device is None and 'LOCAL_RANK' in os.environ:
                import torch

                if torch.cuda.is_available():   # VLMEvalKit's torchrun mode: one model per local GPU
                    device = f"cuda:{os.environ['LOCAL_RANK']}"
            self.model_path = model_path
            self.max_new_tokens = max_new_tokens
            self.generator = MLLMGenerator(model_path, device=device, dtype=dtype, system=system, batch_size=1)

        def use_custom_prompt(self, dataset):
            return False

        def generate_inner(self, message, dataset=None):
            return answer_message(self.generator, message, self.max_new_tokens)

else:

    class ViQMLLMVLMEval:
        """Placeholder: VLMEvalKit is not installed (see MISSING_VLMEVAL)."""

        INTERLEAVE = True

        def __init__(self, *args, **kwargs):
            raise ImportError(MISSING_VLMEVAL) from _IMPORT_ERROR


__all__ = ['MISSING_VLMEVAL', 'ViQMLLMVLMEval', 'answer_message', 'as_message_list']
