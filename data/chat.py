"""Qwen2.5 chat formatting with ViQ images, and the loss mask, built turn by turn.

A conversation is a list of LLaVA turns `{"from": "human"|"gpt"|"system", "value": str}`
(OpenAI-style `{"role": "user"|"assistant"|"system", "content": str}` is accepted too) whose
text holds one `<image>` placeholder per image. The rendered text is exactly what Qwen2.5's
chat template produces:

    <|im_start|>system\n{system}<|im_end|>\n            (default Qwen system prompt if none)
    <|im_start|>user\n{text with images}<|im_end|>\n
    <|im_start|>assistant\n{answer}<|im_end|>\n
    ...

Each turn is tokenized on its own with the real tokenizer. That equals tokenizing the whole
rendered conversation because every turn starts and ends at a special token, across which
byte-level BPE never merges. Each `<image>` becomes the LLM positions of a ViQ token grid
of h x w (see data/vocab.py):

    <|vision_start|> ( <|image_pad|> * w  <row_end> ) * h <|vision_end|>

Decisions, as LLaVA / LLaMA-Factory / Qwen's own fine-tuning scripts make them:
- Supervised (label = input id): each assistant turn's content, its closing `<|im_end|>`
  and the `\\n` after it (LLaMA-Factory's Qwen template and Qwen's fine-tuning script both
  train on `<|im_end|>\\n`; generation stops at `<|im_end|>`, so the newline is never
  sampled). Everything else, including the `<|im_start|>assistant\\n` header, system and
  user turns and all image positions, is -100.
- Images but no `<image>` anywhere in the conversation: the images are placed at the start
  of the first human turn, one `<image>\\n` each (LLaVA's convention for such records).
  Otherwise the number of placeholders must equal the number of grids.
- System prompt: a leading system turn in the conversation wins, then the `system=`
  argument, then Qwen2.5's default ("You are Qwen, created by Alibaba Cloud. ...").
- `max_len`: whole trailing rounds are dropped until the sample fits (an image is never cut
  in half); if not even the first round fits, `ConversationTooLongError` is raised so a
  loader can skip the record. `n_images` in the result says how many leading images remain.
"""
from __future__ import annotations

import numpy as np
import torch

from data.tokenizer import QWEN25_DEFAULT_SYSTEM
from data.vocab import IGNORE_INDEX, CodeVocab
from viq.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
# VLMEvalKit's prompt pieces (ImageVQADataset's suffix, ImageMCQDataset's instruction, whose space
# before the newline is upstream's). The synthetic training prompts use them too, so the demo model
# is trained on the prompts eval.prompts builds.
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class ConversationTooLongError(DataError):
    """Not even the first round of a conversation fits in `max_len` positions."""


def image_span(vocab: CodeVocab, h: int, w: int) -> list[int]:
    """LLM input ids of one image of h x w ViQ tokens (length vocab.image_length(h, w))."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image grid must be at least 1 x 1 tokens, got {h} x {w}")
    row = [vocab.image_pad_id] * w + [vocab.row_end_id]
    return [vocab.vision_start_id] + row * h + [vocab.vision_end_id]


def collapse_image_spans(ids: list[int], vocab: CodeVocab) -> list[int]:
    """Replace every `<|vision_start|> ... <|vision_end|>` span with start, one pad, end.

    Used to compare against text-only renderings where each image is a single placeholder.
    """
    out: list[int] = []
    inside = False
    for token in ids:
        if token == vocab.vision_start_id:
            inside = True
            out += [vocab.vision_start_id, vocab.image_pad_id]
        elif token == vocab.vision_end_id:
            inside = False
            out.append(vocab.vision_end_id)
        elif not inside:
            out.append(token)
    return out


def _normalise_turns(conversations: list[dict], system: str | None) -> tuple[str, list[tuple[str, str, int]]]:
    """(system prompt, [(role, text, index in the input), ...]) with roles mapped to user/assistant."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise DataError("conversations must be a non-empty list of turns")
    turns: list[tuple[str, str, int]] = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"turn {index}: expected a dict with 'from'/'value', got {type(turn).__name__}")
        raw_role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError(f"turn {index}: role {raw_role!r} is not one of {', '.join(ROLE_ALIASES)}")
        if not isinstance(text, str):
            raise DataError(f"turn {index}: 'value' must be a string, got {type(text).__name__}")
        if role == "system" and index > 0:
            raise DataError(f"turn {index}: a system turn may only come first")
        turns.append((role, text, index))
    system_prompt = system
    if turns[0][0] == "system":
        system_prompt = turns.pop(0)[1]
    if system_prompt is None:
        system_prompt = QWEN25_DEFAULT_SYSTEM
    if IMAGE_PLACEHOLDER in system_prompt:
        raise DataError("system prompt: '<image>' belongs in a human turn")
    return system_prompt, turns


def _place_images(turns: list[tuple[str, str, int]], n_grids: int) -> list[tuple[str, str, int]]:
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text, _ in turns)
    if n_placeholders == 0 and n_grids > 0:
        # LLaVA convention: images without placeholders precede the first question.
        for position, (role, text, index) in enumerate(turns):
            if role == "user":
                turns = list(turns)
                turns[position] = (role, (IMAGE_PLACEHOLDER + "\n") * n_grids + text, index)
                return turns
        raise DataError(f"{n_grids} image(s) given but the conversation has no human turn to hold them")
    if n_placeholders != n_grids:
        raise DataError(f"conversation has {n_placeholders} '<image>' placeholder(s) but {n_grids} image grid(s) were given")
    for role, text, index in turns:
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise DataError(f"turn {index}: '<image>' in an assistant turn; images belong to human turns")
    return turns


class _TurnEncoder:
    """Tokenizes one chat turn at a time; image placeholders become ViQ grids."""

    def __init__(self, tokenizer, vocab: CodeVocab):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.reserved = {vocab.vision_start_id, vocab.vision_end_id, vocab.image_pad_id}

    def _text(self, text: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The same Rust tokenizer `tokenizer(...)` runs, minus ~40 us of Python per call.
            enc = backend.encode(text, add_special_tokens=False)
            ids, offsets = enc.ids, enc.offsets
        else:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        clash = self.reserved.intersection(ids)
        if clash:
            names = ", ".join(self.tokenizer.convert_ids_to_tokens(sorted(clash)))
            raise DataError(f"{where}: text contains image token(s) {names}; use '<image>' placeholders instead")
        return ids, offsets

    def encode(self, role: str, text: str, grids: list[tuple[int, int]], where: str, supervise: bool):
        """ids and labels of `<|im_start|>{role}\\n{text}<|im_end|>\\n`, consuming grids in order."""
        header = f"<|im_start|>{role}\n"
        pieces = text.split(IMAGE_PLACEHOLDER)
        pieces[0] = header + pieces[0]
        pieces[-1] = pieces[-1] + "<|im_end|>\n"
        ids: list[int] = []
        labels: list[int] = []
        for index, piece in enumerate(pieces):
            if index > 0:
                h, w = grids[index - 1]
                span = image_span(self.vocab, int(h), int(w))
                ids += span
                labels += [IGNORE_INDEX] * len(span)
            piece_ids, offsets = self._text(piece, where)
            ids += piece_ids
            if supervise:
                # A token is the model's to predict once it holds any character past the header
                # (offsets, not a fixed count: BPE can merge the header's "\n" with leading content).
                content_start = len(header) if index == 0 else 0
                labels += [t if end > content_start else IGNORE_INDEX for t, (_, end) in zip(piece_ids, offsets)]
            else:
                labels += [IGNORE_INDEX] * len(piece_ids)
        return ids, labels


def _grid_list(image_grids) -> list[tuple[int, int]]:
    grids = []
    for index, grid in enumerate(image_grids or []):
        if len(grid) != 2:
            raise ValueError(f"image_grids[{index}]: expected (h, w), got {grid!r}")
        grids.append((int(grid[0]), int(grid[1])))
    return grids


def _as_tensor(values: list[int]) -> torch.Tensor:
    # Through numpy: a third of the cost of torch.tensor(list) at these lengths.
    return torch.from_numpy(np.array(values, dtype=np.int64))


def build_sample(
    tokenizer, vocab: CodeVocab, conversations: list[dict], image_grids=(), *, system: str | None = None,
    max_len: int | None = None,
) -> dict:
    """One training sample: {"input_ids", "labels", "n_image_tokens", "n_images"}.

    `n_image_tokens` counts `<|image_pad|>` positions (sum of h * w over kept images), the
    positions that receive code embeddings; `n_images` is how many leading images were kept.
    """
    grids = _grid_list(image_grids)
    system_prompt, turns = _normalise_turns(conversations, system)
    turns = _place_images(turns, len(grids))
    if not any(role == "assistant" for role, _, _ in turns):
        raise DataError("conversation has no gpt/assistant turn, so nothing would be supervised")
    encoder = _TurnEncoder(tokenizer, vocab)
    ids, labels = encoder.encode("system", system_prompt, [], "system prompt", supervise=False)

    # Rounds end after each assistant turn; truncation keeps whole rounds only.
    fitted_ids, fitted_labels, fitted_images = None, None, 0
    next_grid = 0
    for role, text, index in turns:
        n_here = text.count(IMAGE_PLACEHOLDER)
        turn_ids, turn_labels = encoder.encode(
            role, text, grids[next_grid:next_grid + n_here], f"turn {index}", supervise=role == "assistant"
        )
        next_grid += n_here
        ids += turn_ids
        labels += turn_labels
        if role == "assistant":
            if max_len is not None and len(ids) > max_len:
                break
            fitted_ids, fitted_labels, fitted_images = list(ids), list(labels), next_grid
    if fitted_ids is None:
        raise ConversationTooLongError(
            f"first round needs {len(ids)} positions, more than max_len={max_len}"
        )
    kept = grids[:fitted_images]
    return {
        "input_ids": _as_tensor(fitted_ids),
        "labels": _as_tensor(fitted_labels),
        "n_image_tokens": sum(h * w for h, w in kept),
        "n_images": len(kept),
    }


def build_prompt(tokenizer, vocab: CodeVocab, messages: list[dict], image_grids=(), *, system: str | None = None) -> dict:
    """Generation prompt ending with `<|im_start|>assistant\\n`: {"input_ids", "n_image_tokens"}.

    `messages` use the same turn format as build_sample and must end with a human turn.
    """
    grids = _grid_list(image_grids)
    system_prompt, turns = _normalise_turns(messages, system)
    turns = _place_images(turns, len(grids))
    if not turns or turns[-1][0] != "user":
        raise ValueError("a generation prompt must end with a human/user turn")
    encoder = _TurnEncoder(tokenizer, vocab)
    ids, _ = encoder.encode("system", system_prompt, [], "system prompt", supervise=False)
    next_grid = 0
    for role, text, index in turns:
        n_here = text.count(IMAGE_PLACEHOLDER)
        turn_ids, _ = encoder.encode(role, text, grids[next_grid:next_grid + n_here], f"turn {index}", supervise=False)
        next_grid += n_here
        ids += turn_ids
    ids += encoder._text("<|im_start|>assistant\n", "generation prompt")[0]
    return {"input_ids": _as_tensor(ids), "n_image_tokens": sum(h * w for h, w in grids)}
