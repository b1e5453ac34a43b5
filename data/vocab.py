"""Layout of the extended vocabulary: Qwen2.5 text ids, then the ViQ code ids.

Qwen2.5's embedding has 151,936 rows while its tokenizer has 151,665 entries; the rows in
between are padding that checkpoints leave untrained. Code ids therefore start at the
embedding's current row count (never "the last N rows" of a resized matrix):

    [0, text_vocab_size)                 tokenizer entries (text + special tokens)
    [text_vocab_size, embedding_rows)    the checkpoint's padding rows (kept as they are)
    [code_base, code_base + K)           one id per FSQ code (K = prod(levels))
    row_end_id = code_base + K           ends each row of an image's token grid
    up to total_rows                     padding to a multiple of `pad_to` (initialised too)

An image becomes `<|vision_start|>`, then for each of its h rows w positions (one per ViQ
token, whose 4 sub-codes are merged into that position by the model) and one row-end
position, then `<|vision_end|>`. Image-token positions carry `image_pad_id` in `input_ids`;
their code ids travel beside them as an [n, 4] tensor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from viq.errors import CheckpointError
from viq.quantizer import SUBCODES  # noqa: F401 - 2x2 sub-codes per ViQ token; data/ imports it from here

# Label of positions the loss skips (torch cross_entropy's ignore_index); chat and packing use it.
IGNORE_INDEX = -100

# Qwen2.5 special tokens (ids 151643-151664), identical across Qwen2 / 2.5.
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655


@dataclass(frozen=True)
class CodeVocab:
    text_vocab_size: int
    embedding_rows: int
    codebook_size: int
    pad_to: int = 64
    vision_start_id: int = VISION_START_ID
    vision_end_id: int = VISION_END_ID
    image_pad_id: int = IMAGE_PAD_ID

    def __post_init__(self):
        if self.embedding_rows < self.text_vocab_size:
            raise CheckpointError(
                f"embedding has {self.embedding_rows} rows but the tokenizer {self.text_vocab_size} entries; "
                "the checkpoint's config.json vocab_size and its tokenizer do not belong together"
            )
        if self.codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {self.codebook_size}")

    @property
    def code_base(self) -> int:
        return self.embedding_rows

    @property
    def row_end_id(self) -> int:
        return self.code_base + self.codebook_size

    @property
    def total_rows(self) -> int:
        n = self.row_end_id + 1
        return -(-n // self.pad_to) * self.pad_to

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """FSQ indices (any shape, values in [0, K)) -> extended-vocabulary ids (int64)."""
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"code index out of range [0, {self.codebook_size}): min {int(codes.min())}, max {int(codes.max())}"
            )
        return codes + self.code_base

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        return ids - self.code_base

    def is_code_id(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.code_base) & (ids < self.row_end_id)

    def image_length(self, h: int, w: int) -> int:
        """LLM positions one image of h x w ViQ tokens takes (start + rows with row ends + end)."""
        return 2 + h * (w + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodeVocab":
        return cls(**d)
