"""A ViQ-MLLM export as a VLMEvalKit model, and our synthetic benchmarks as VLMEvalKit datasets.

VLMEvalKit's own `run.py`, with the export registered as model `ViQ-MLLM` and the SYNTH_*
benchmarks registered as datasets (this repository on PYTHONPATH, the data under $LMUData):

    python -m eval.adapters.vlmevalkit --model-path runs/viq-0.5b/hf --data MMStar SYNTH_SHAPES \\
        --work-dir outputs --judge exact_matching
    torchrun --nproc-per-node 8 -m eval.adapters.vlmevalkit --model-path ... --data DocVQA_VAL

Every argument besides --model-path / --model-name / --max-new-tokens / --device / --dtype /
--system goes to VLMEvalKit's run.py unchanged. From Python, `register_with_vlmeval(model_path=...)`
does the same registration (then `vlmeval.run.main()`, `vlmeval.dataset.build_dataset('SYNTH_DOC')`
or `vlmeval.inference.infer_data_job` work as usual), and `ViQMLLMVLMEval` is the model class for
an entry of your own in VLMEvalKit's `supported_VLM`.

The model: `use_custom_prompt` is False, so VLMEvalKit builds the prompts with its dataset
classes (which `eval/benchmarks` reproduce) and the model answers them as `python -m eval.run`
does: the same message-to-chat translation and greedy decoding (`eval.generate.MLLMGenerator`).
The SYNTH_* datasets: VLMEvalKit's ImageVQADataset / ImageMCQDataset reading
$LMUData/<KEY>.tsv (SYNTH_VAL_<X> falls back to SYNTH_<X>.tsv), scored with the rule of the
benchmark they imitate (ChartQA relaxed accuracy, DocVQA ANLS, exact-matching choice).

VLMEvalKit is imported on first use of these names (eval.adapters.vlmeval_import explains the
torchvision placeholder it may need on CPU machines); without it, this module still imports and
the names raise an ImportError that says what to install.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from eval.adapters.vlmeval_import import MISSING_VLMEVAL, import_vlmeval
from eval.benchmarks import BENCHMARKS, ChoiceBenchmark, VQABenchmark
from eval.generate import DEFAULT_MAX_NEW_TOKENS, MLLMGenerator

MODEL_NAME = 'ViQ-MLLM'
# SYNTH_VIDEO is left out: VLMEvalKit runs video benchmarks through VideoBaseDataset (its own frame
# sampling and prompt), which this adapter does not wire; eval.run scores it.
SYNTH_KEYS = tuple(k for k in BENCHMARKS if k.startswith('SYNTH_') and k != 'SYNTH_VIDEO')
# VLMEvalKit picks an ImageVQADataset's metric from a substring of the dataset name.
_METRIC_DATASET = {'relaxed_accuracy': 'ChartQA_TEST', 'anls': 'DocVQA_VAL', 'vqa_score': 'TextVQA_VAL'}
_LAZY = ('ViQMLLMVLMEval', 'SynthVQADataset', 'SynthMCQDataset')
_classes: dict = {}


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


def synth_data_path(root, key: str) -> Path:
    """$LMUData/<KEY>.tsv; a SYNTH_VAL_<X> key falls back to SYNTH_<X>.tsv, as eval.benchmarks reads it."""
    candidates = [Path(root) / f'{key}.tsv']
    data_key = BENCHMARKS[key].data_key
    if data_key and data_key != key:
        candidates.append(Path(root) / f'{data_key}.tsv')
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{key}: no {' or '.join(str(c) for c in candidates)}; write the synthetic set with "
                            f"python scripts/make_synthetic_data.py and point LMUData at its vlmeval/ directory")


def _build_classes() -> dict:
    if _classes:
        return _classes
    vlmeval = import_vlmeval()
    from vlmeval.dataset import ImageMCQDataset, ImageVQADataset
    from vlmeval.smp import LMUDataRoot, load
    from vlmeval.vlm.base import BaseModel

    class ViQMLLMVLMEval(BaseModel):
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

    class _LocalSynthData:
        # Local files only: no URL, no checksum, nothing to download.
        def load_data(self, dataset):
            return load(str(synth_data_path(LMUDataRoot(), dataset)))

    class SynthVQADataset(_LocalSynthData, ImageVQADataset):
        DATASET_URL = {k: '' for k in SYNTH_KEYS if issubclass(BENCHMARKS[k], VQABenchmark)}
        DATASET_MD5 = {}

        def evaluate(self, eval_file, **judge_kwargs):
            name = self.dataset_name
            self.dataset_name = _METRIC_DATASET[BENCHMARKS[name].method]
            try:
                return super().evaluate(eval_file, **judge_kwargs)
            finally:
                self.dataset_name = name

    class SynthMCQDataset(_LocalSynthData, ImageMCQDataset):
        DATASET_URL = {k: '' for k in SYNTH_KEYS if issubclass(BENCHMARKS[k], ChoiceBenchmark)}
        DATASET_MD5 = {}

    _classes.update(vlmeval=vlmeval, ViQMLLMVLMEval=ViQMLLMVLMEval, SynthVQADataset=SynthVQADataset,
                    SynthMCQDataset=SynthMCQDataset)
    return _classes


def __getattr__(name):
    if name in _LAZY:
        return _build_classes()[name]
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def register_with_vlmeval(model_name: str = MODEL_NAME, **model_kwargs) -> None:
    """Add the SYNTH_* datasets to VLMEvalKit's dataset list and, given model_kwargs (model_path=...),
    the export to its `supported_VLM` under `model_name`."""
    classes = _build_classes()
    import vlmeval.config
    import vlmeval.dataset

    for cls in (classes['SynthVQADataset'], classes['SynthMCQDataset']):
        if cls not in vlmeval.dataset.DATASET_CLASSES:
            vlmeval.dataset.DATASET_CLASSES.insert(0, cls)
    if model_kwargs:
        vlmeval.config.supported_VLM[model_name] = partial(classes['ViQMLLMVLMEval'], **model_kwargs)


def main(argv=None) -> int:
    """Register the export and the SYNTH_* datasets, then run VLMEvalKit's run.py with the other arguments."""
    parser = argparse.ArgumentParser(prog='python -m eval.adapters.vlmevalkit', description=main.__doc__, allow_abbrev=False,
                                     epilog="other arguments go to VLMEvalKit's run.py (--data, --work-dir, --judge, "
                                            "--mode, ...)")
    parser.add_argument('--model-path', required=True, help='ViQ-MLLM export directory (runs/<run>/hf)')
    parser.add_argument('--model-name', default=MODEL_NAME, help=f'name in VLMEvalKit (default {MODEL_NAME})')
    parser.add_argument('--max-new-tokens', type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument('--device', default=None)
    parser.add_argument('--dtype', default=None)
    parser.add_argument('--system', default=None)
    args, rest = parser.parse_known_args(argv)
    if not Path(args.model_path, 'viq_mllm.json').is_file():
        print(f'error: --model-path {args.model_path}: not a ViQ-MLLM export (no viq_mllm.json)', file=sys.stderr)
        return 2
    try:
        register_with_vlmeval(args.model_name, model_path=args.model_path, max_new_tokens=args.max_new_tokens,
                              device=args.device, dtype=args.dtype, system=args.system)
    except ImportError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    import vlmeval.run

    sys.argv = ['run.py', '--model', args.model_name, *rest]
    vlmeval.run.main()
    return 0


__all__ = ['MISSING_VLMEVAL', 'MODEL_NAME', 'SYNTH_KEYS', 'ViQMLLMVLMEval', 'answer_message', 'as_message_list',
           'main', 'register_with_vlmeval', 'synth_data_path']

if __name__ == '__main__':
    sys.exit(main())
