"""Greedy answers of an exported ViQ-MLLM to VLMEvalKit message lists.

    generator = MLLMGenerator('runs/demo/hf', device='cuda', dtype=torch.bfloat16)
    answers = generator.generate([[{'type': 'image', 'value': img}, {'type': 'text', 'value': 'Q?'}]])

A message list (what `Benchmark.build_prompt` and VLMEvalKit's datasets produce) becomes one
human turn of the chat template in `data.chat`: every image is a `<image>` placeholder at
the place it occurs and its ViQ codes fill that placeholder's grid. Images that come before
any text (the usual VLMEvalKit layout) are written `<image>\\n`, one per line, exactly the
LLaVA convention the training data uses (`data.chat` places placeholder-less images that
way); images inside the text (MMMU's `<image k>` interleaving) take no separator, so the
question text stays as the benchmark wrote it. A `{'type': 'video'}` item is sampled,
decoded and laid out exactly as training lays out video records (data/video.py), with the
sampling settings the export recorded (`video.json`, the run's `data.video`).

Prompts are sorted by length before batching (less padding), decoded greedily with the KV
cache of `ViQMLLM.generate_from_codes`, and returned in the caller's order. Left padding and
the attention mask make every answer equal to decoding that prompt alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from data.chat import IMAGE_PLACEHOLDER, build_prompt
from data.video import frame_layout, frame_pixels, plan_frames, read_video_settings, video_label
from data.vocab import ENDOFTEXT_ID, IM_END_ID, SUBCODES
from data.dataset import BLIND_CODE
from mllm.export import MARKER_FILE, is_blind_export, load_export, load_viq
from viq.dtypes import default_device, parse_dtype
from viq.errors import CheckpointError

DEFAULT_MAX_NEW_TOKENS = 64   # the benchmarks ask for a word, a phrase or an option letter
# A literal '<image>' in benchmark text would be read as a placeholder; this spelling keeps the
# characters readable for the model without being one.
_LITERAL_PLACEHOLDER = '< image>'


class ExportError(CheckpointError):
    """The model directory is not a usable ViQ-MLLM export."""


@dataclass
class PreparedPrompt:
    """One prompt ready for the LLM: text ids with image_pad positions, and their code ids [M, 4]."""

    input_ids: torch.Tensor
    codes: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def model_name_from_path(export_dir) -> str:
    """The export directory's name; for the trainer's `runs/<run_name>/hf` layout, the run name."""
    path = Path(export_dir).resolve()
    return path.parent.name if path.name == 'hf' and path.parent.name else path.name


def check_export_dir(export_dir) -> Path:
    """One-line errors for a path that is not a ViQ-MLLM export able to read images."""
    root = Path(export_dir)
    if not root.is_dir():
        raise ExportError(f'--model {root}: directory not found (expected a ViQ-MLLM export, e.g. runs/<run>/hf)')
    missing = [name for name in ('config.json', MARKER_FILE, 'vocab.json', 'merger.safetensors')
               if not (root / name).is_file()]
    if missing:
        raise ExportError(f"--model {root} is not a ViQ-MLLM export: missing {', '.join(missing)} "
                          f'(write one with mllm.export.save_export or the trainer)')
    if not (root / 'tokenizer.json').is_file() and not (root / 'tokenizer_config.json').is_file():
        raise ExportError(f'--model {root}: the export has no tokenizer files (tokenizer.json); re-export with a tokenizer')
    if not (root / 'viq' / 'config.json').is_file():
        raise ExportError(f'--model {root}: the export has no ViQ tokenizer ({root / "viq"}/config.json missing); '
                          f're-export with viq_dir_or_config so images can be encoded')
    return root


@dataclass(frozen=True)
class VideoItem:
    """A video of a message list (its path or encoded bytes), told apart from images."""

    ref: object


def human_turn(messages: Sequence[dict]) -> tuple[str, list]:
    """VLMEvalKit message list -> (turn text with '<image>' placeholders, images and VideoItems in order)."""
    text, images = '', []
    seen_text = False
    for position, item in enumerate(messages):
        kind = item.get('type') if isinstance(item, dict) else None
        if kind in ('image', 'video'):
            images.append(item['value'] if kind == 'image' else VideoItem(item['value']))
            text += IMAGE_PLACEHOLDER + ('' if seen_text else '\n')
        elif kind == 'text':
            value = str(item['value'])
            text += value.replace(IMAGE_PLACEHOLDER, _LITERAL_PLACEHOLDER)
            seen_text = seen_text or bool(value)
        else:
            raise ValueError(f"message item {position}: type must be 'image', 'video' or 'text', got {item!r:.80}")
    return text, images


class MLLMGenerator:
    """An exported ViQ-MLLM plus its ViQ tokenizer, answering message lists greedily."""

    def __init__(self, export_dir, device: str | None = None, dtype: str | torch.dtype | None = None, *,
                 system: str | None = None, attn_implementation: str = 'auto', batch_size: int = 8):
        root = check_export_dir(export_dir)
        self.export_dir = root
        self.device = device or default_device()
        self.dtype = parse_dtype(dtype, self.device)
        self.model, self.tokenizer, self.vocab = load_export(root, device=self.device, dtype=self.dtype,
                                                             attn_implementation=attn_implementation)
        # The ViQ encoder stays in float32: codes are integers and fp32 keeps FSQ rounding exact.
        self.viq = load_viq(root, device=self.device)
        self.video = read_video_settings(root)
        self.blind = is_blind_export(root)  # a blind baseline sees every image as the fixed code it trained on
        self.system = system
        self.batch_size = batch_size
        eos = {IM_END_ID, ENDOFTEXT_ID}
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = sorted(eos)
        self.pad_token_id = ENDOFTEXT_ID if self.tokenizer.pad_token_id is None else int(self.tokenizer.pad_token_id)
        self.prompts_generated = 0   # how many prompts went through the LLM (resume bookkeeping)

    # -- prompts ------------------------------------------------------------------------------

    def prepare(self, messages_batch: Sequence[Sequence[dict]]) -> list[PreparedPrompt]:
        """Encode every image of the batch in one ViQ call and build each chat prompt."""
        turns = [human_turn(messages) for messages in messages_batch]
        if any(isinstance(item, VideoItem) for _, images in turns for item in images):
            turns = [self._with_frames(text, images) for text, images in turns]
            pixels = [p for _, frames in turns for p in frames]
            self.viq.eval()
            with torch.inference_mode():
                codes = self.viq.encode_pixels(pixels)
        else:
            all_images = [image for _, images in turns for image in images]
            codes = self.viq.encode(all_images) if all_images else []
        if self.blind:
            codes = [torch.full_like(c, BLIND_CODE) for c in codes]
        prompts, next_image = [], 0
        for text, images in turns:
            grids = codes[next_image:next_image + len(images)]
            next_image += len(images)
            built = build_prompt(self.tokenizer, self.vocab, [{'from': 'human', 'value': text}],
                                 [(g.shape[0], g.shape[1]) for g in grids], system=self.system)
            flat = [g.reshape(-1, SUBCODES) for g in grids]
            code_ids = self.vocab.codes_to_ids(torch.cat(flat)) if flat else torch.zeros((0, SUBCODES), dtype=torch.long)
            prompts.append(PreparedPrompt(built['input_ids'], code_ids))
        return prompts

    def _with_frames(self, text: str, items: list) -> tuple[str, list[torch.Tensor]]:
        """The turn with each video's placeholder laid out as its frames, and every image's or
        frame's preprocessed pixels in order (frames resized with the per-frame budget)."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        out, pixels = pieces[0], []
        for item, piece in zip(items, pieces[1:]):
            if isinstance(item, VideoItem):
                label = video_label(item.ref)
                plan = plan_frames(item.ref, self.video, label)
                pixels += frame_pixels(item.ref, plan, self.video, self.viq.config.resize_policy, [label] * len(plan.pts))
                out += frame_layout([round(t, 3) for t in plan.seconds], self.video.timestamps)
            else:
                pixels += self.viq.preprocess([item])
                out += IMAGE_PLACEHOLDER
            out += piece
        return out, pixels

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, token_ids: list[int]) -> str:
        # Code / row-end ids are not in the tokenizer; a text answer has no business containing them.
        text_ids = [t for t in token_ids if t < self.vocab.text_vocab_size]
        return self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()

    def generate_prepared(self, prompts: Sequence[PreparedPrompt], max_new_tokens: int,
                          batch_size: int | None = None) -> Iterator[list[tuple[int, str]]]:
        """Yield, per LLM batch (longest prompts first), [(position in `prompts`, answer), ...]."""
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            outputs = self.model.generate_from_codes(
                [(prompts[i].input_ids, prompts[i].codes) for i in chunk], max_new_tokens,
                eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
            self.prompts_generated += len(chunk)
            yield [(i, self.decode(ids)) for i, ids in zip(chunk, outputs)]

    def generate(self, messages_batch: Sequence[Sequence[dict]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 batch_size: int | None = None, on_batch: Callable[[list[tuple[int, str]]], None] | None = None
                 ) -> list[str]:
        """Answers to message lists, in the given order (batched internally, longest first)."""
        prompts = self.prepare(messages_batch)
        answers: list[str | None] = [None] * len(prompts)
        for done in self.generate_prepared(prompts, max_new_tokens, batch_size):
            for position, answer in done:
                answers[position] = answer
            if on_batch is not None:
                on_batch(done)
        return answers
