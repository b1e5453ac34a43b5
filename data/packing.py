"""Sequence packing: best-fit-decreasing bins and the packed-batch collate.

Packing puts several samples into one row of `capacity` tokens (4096 / 16384 presets) so
that almost no compute goes to padding. Attention must never cross samples, so a packed
batch carries the sample boundaries compactly (`cu_seqlens`, `document_ids`); dense
[T, T] masks are built, if a backend needs one, on the device from those.

Label convention (unshifted, as Hugging Face causal-LM losses expect): `labels[t]` is the
target for the prediction made at position t-1; the model (or HF's loss) shifts by one.
Because samples sit back to back, a global shift would make the last token of sample s
predict the first token of sample s+1. collate_packed therefore sets the label of the
first token of every sample to -100: that token is never a target (nothing inside its
own sample precedes it), so no information is lost and the global shift never crosses a
sample boundary. `n_supervised` counts `labels != -100` of the packed row, which equals
the per-sample count of `labels[1:] != -100`, the number of tokens the loss averages over.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass

import torch

from data.vocab import ENDOFTEXT_ID, IGNORE_INDEX, IMAGE_PAD_ID, SUBCODES
from viq.errors import ConfigError

MAX_SEQ_LEN_PRESETS = {"4k": 4096, "16k": 16384}
OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class PackingStats:
    """What packing did; over-long samples are always counted, never silently altered."""

    capacity: int = 0
    n_samples: int = 0  # samples seen (including dropped ones)
    n_packs: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_unsupervised: int = 0  # over-long samples dropped because the cut would leave no supervised token
    n_real_tokens: int = 0  # tokens placed in packs (after truncation)

    @property
    def efficiency(self) -> float:
        """Real tokens / (packs * capacity): 1.0 means no padding at all."""
        total = self.n_packs * self.capacity
        return self.n_real_tokens / total if total else 0.0

    def update(self, other: "PackingStats") -> None:
        if self.capacity and other.capacity and self.capacity != other.capacity:
            raise ValueError(f"cannot merge packing stats of capacity {other.capacity} into {self.capacity}")
        self.capacity = self.capacity or other.capacity
        self.n_samples += other.n_samples
        self.n_packs += other.n_packs
        self.n_truncated += other.n_truncated
        self.n_dropped += other.n_dropped
        self.n_unsupervised += other.n_unsupervised
        self.n_real_tokens += other.n_real_tokens

    def to_dict(self) -> dict:
        out = asdict(self)
        out["efficiency"] = self.efficiency
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PackingStats":
        return cls(**{k: v for k, v in d.items() if k != "efficiency"})


def resolve_max_seq_len(value: int | str) -> int:
    """`4096`, `"4k"` or `"16k"` -> token capacity; unknown preset names fail listing valid ones."""
    if isinstance(value, str) and not value.isdigit():
        if value not in MAX_SEQ_LEN_PRESETS:
            raise ConfigError(f"unknown max_seq_len preset '{value}'; valid: {', '.join(MAX_SEQ_LEN_PRESETS)} or an integer")
        return MAX_SEQ_LEN_PRESETS[value]
    capacity = int(value)
    if capacity <= 0:
        raise ConfigError(f"max_seq_len must be positive, got {capacity}")
    return capacity


def check_overlong_policy(policy: str) -> str:
    if policy not in OVERLONG_POLICIES:
        raise ConfigError(f"unknown overlong policy '{policy}'; valid: {', '.join(OVERLONG_POLICIES)}")
    return policy


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: indices of `lengths` grouped into packs of total <= capacity.

    Items are taken longest first (ties by index, so the result is deterministic) and each
    goes into the open pack with the least remaining room that still fits it, else a new
    pack. Remaining capacities are kept sorted, so each placement is one bisect: ~100k
    items pack in well under a second. Packs come out in creation order; inside a pack
    the items are in placement order (longest first). Every length must be in
    [1, capacity]: apply the over-long policy first (see plan_packs).
    """
    for i, n in enumerate(lengths):
        if n < 1 or n > capacity:
            raise ValueError(f"item {i} has length {n}; pack_best_fit needs 1 <= length <= capacity ({capacity})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    # Open packs as (remaining room, pack id), sorted; a full pack leaves the list.
    open_packs: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        slot = bisect.bisect_left(open_packs, (n, -1))
        if slot < len(open_packs):
            room, pack_id = open_packs.pop(slot)
            packs[pack_id].append(i)
            room -= n
            if room > 0:
                bisect.insort(open_packs, (room, pack_id))
        else:
            packs.append([i])
            if capacity - n > 0:
                bisect.insort(open_packs, (capacity - n, len(packs) - 1))
    return packs


def plan_packs(lengths: list[int], capacity: int, overlong: str = "truncate") -> tuple[list[list[int]], PackingStats]:
    """Apply the over-long policy, then pack best-fit-decreasing.

    `truncate`: a sample longer than capacity is cut to capacity (it fills a pack alone);
    `drop`: it is left out. Either way it is counted in the returned stats.
    """
    check_overlong_policy(overlong)
    stats = PackingStats(capacity=capacity, n_samples=len(lengths))
    kept: list[int] = []
    kept_lengths: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            if overlong == "drop":
                stats.n_dropped += 1
                continue
            stats.n_truncated += 1
            n = capacity
        if n < 1:
            raise ValueError(f"sample {i} has length {n}; every sample needs at least one token")
        kept.append(i)
        kept_lengths.append(n)
    packs = [[kept[j] for j in pack] for pack in pack_best_fit(kept_lengths, capacity)]
    stats.n_packs = len(packs)
    stats.n_real_tokens = sum(kept_lengths)
    return packs, stats


def truncate_sample(sample: dict, max_len: int, image_pad_id: int = IMAGE_PAD_ID) -> dict:
    """Cut a sample to its first `max_len` tokens, keeping its codes in step.

    Codes travel beside the `image_pad_id` positions (one [4] row per position), so the
    codes kept are those of the image positions that survive the cut. A sample that
    carries raw `images` instead cannot lose part of an image; cutting into one fails
    (use overlong='drop' for such data).
    """
    ids = sample["input_ids"]
    if ids.numel() <= max_len:
        return sample
    out = dict(sample)
    out["input_ids"] = ids[:max_len]
    out["labels"] = sample["labels"][:max_len]
    n_image_kept = int((out["input_ids"] == image_pad_id).sum())
    n_image_all = int((ids == image_pad_id).sum())
    if sample.get("codes") is not None:
        out["codes"] = sample["codes"][:n_image_kept]
    if sample.get("images") and n_image_kept != n_image_all:
        raise ConfigError(
            f"truncating a sample of {ids.numel()} tokens to {max_len} cuts into one of its {len(sample['images'])} raw images; "
            "use overlong='drop' or a larger max_seq_len"
        )
    return out


def _segment_tensors(lengths: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cu_seqlens (int32), position_ids and document_ids for back-to-back segments."""
    seg_lens = torch.tensor(lengths, dtype=torch.int32)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(seg_lens, dim=0, out=cu_seqlens[1:])
    document_ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), seg_lens.long(), output_size=total)
    starts = cu_seqlens[:-1].long()
    position_ids = torch.arange(total, dtype=torch.long) - torch.repeat_interleave(starts, seg_lens.long(), output_size=total)
    return cu_seqlens, position_ids, document_ids


def collate_packed(
    samples: list[dict],
    capacity: int,
    pad_to_capacity: bool = True,
    pad_id: int = ENDOFTEXT_ID,
    image_pad_id: int = IMAGE_PAD_ID,
) -> dict:
    """Concatenate samples into one packed row of at most `capacity` tokens.

    samples: dicts with `input_ids` LongTensor[L], `labels` LongTensor[L], optionally
    `codes` LongTensor[M, 4] (one row per `image_pad_id` position, in order) and `images`
    (a list of tensors for the online-encoder path).

    Returns (T = capacity when pad_to_capacity else the real total):
      input_ids, labels, position_ids: LongTensor[1, T]; labels are unshifted with the
        first token of every sample and the padding tail at -100 (module docstring);
        positions restart at 0 for every sample and for the padding tail.
      cu_seqlens: IntTensor[n_segments + 1]; the padding tail, if any, is its own segment.
      seq_lens: IntTensor[n_segments] (= cu_seqlens diffs), max_seqlen: int.
      document_ids: IntTensor[1, T], segment number of each position (padding = n_samples).
      codes: LongTensor[sum M, 4] (possibly [0, 4]: it always exists so every rank runs
        the same modules), images: list (concatenated in sample order).
      n_samples, n_real_tokens, n_supervised (ints), packing_efficiency (real / T).
    """
    if not samples and not pad_to_capacity:
        raise ValueError("collate_packed got no samples and pad_to_capacity=False: the batch would be empty")
    ids_parts, label_parts, code_parts, images = [], [], [], []
    lengths = []
    for k, sample in enumerate(samples):
        ids, labels = sample["input_ids"], sample["labels"]
        if ids.dim() != 1 or labels.shape != ids.shape:
            raise ValueError(
                f"sample {k}: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be equal 1-D shapes"
            )
        if ids.numel() == 0:
            raise ValueError(f"sample {k} has no tokens")
        codes = sample.get("codes")
        if codes is not None:
            n_image = int((ids == image_pad_id).sum())
            if codes.dim() != 2 or codes.shape[1] != SUBCODES or codes.shape[0] != n_image:
                raise ValueError(
                    f"sample {k}: codes {tuple(codes.shape)} must be [{n_image}, {SUBCODES}] (one row per image_pad position)"
                )
            code_parts.append(codes.long())
        images.extend(sample.get("images") or [])
        labels = labels.long().clone()
        labels[0] = IGNORE_INDEX  # the global causal shift must not cross into this sample
        ids_parts.append(ids.long())
        label_parts.append(labels)
        lengths.append(ids.numel())
    n_real = sum(lengths)
    if n_real > capacity:
        raise ValueError(f"samples total {n_real} tokens ({lengths}), over the pack capacity {capacity}")
    total = capacity if pad_to_capacity else n_real
    pad = total - n_real
    seg_lens = lengths + ([pad] if pad else [])
    if pad:
        ids_parts.append(torch.full((pad,), pad_id, dtype=torch.long))
        label_parts.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
    input_ids = torch.cat(ids_parts)
    labels = torch.cat(label_parts)
    cu_seqlens, position_ids, document_ids = _segment_tensors(seg_lens, total)
    return {
        "input_ids": input_ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seqlens": cu_seqlens,
        "seq_lens": cu_seqlens.diff(),
        "max_seqlen": max(seg_lens),
        "document_ids": document_ids.unsqueeze(0),
        "codes": torch.cat(code_parts) if code_parts else torch.zeros((0, SUBCODES), dtype=torch.long),
        "images": images,
        "n_samples": len(samples),
        "n_real_tokens": n_real,
        "n_supervised": int((labels != IGNORE_INDEX).sum()),
        "packing_efficiency": n_real / total,
    }


def concat_packed(batches: list[dict]) -> dict:
    """Join several collated packs into one row [1, sum T] (a micro-batch of packs).

    Varlen attention takes one flat row with cu_seqlens, so packs are concatenated
    rather than stacked; positions and segments stay per sample.
    """
    if len(batches) == 1:
        return batches[0]
    offsets = 0
    cu_parts = [torch.zeros(1, dtype=torch.int32)]
    doc_parts = []
    n_docs = 0
    for b in batches:
        cu_parts.append(b["cu_seqlens"][1:] + offsets)
        offsets += b["input_ids"].shape[1]
        doc_parts.append(b["document_ids"] + n_docs)
        n_docs += b["cu_seqlens"].numel() - 1
    cu_seqlens = torch.cat(cu_parts)
    n_real = sum(b["n_real_tokens"] for b in batches)
    return {
        "input_ids": torch.cat([b["input_ids"] for b in batches], dim=1),
        "labels": torch.cat([b["labels"] for b in batches], dim=1),
        "position_ids": torch.cat([b["position_ids"] for b in batches], dim=1),
        "cu_seqlens": cu_seqlens,
        "seq_lens": cu_seqlens.diff(),
        "max_seqlen": max(b["max_seqlen"] for b in batches),
        "document_ids": torch.cat(doc_parts, dim=1),
        "codes": torch.cat([b["codes"] for b in batches]),
        "images": [img for b in batches for img in b["images"]],
        "n_samples": sum(b["n_samples"] for b in batches),
        "n_real_tokens": n_real,
        "n_supervised": sum(b["n_supervised"] for b in batches),
        "packing_efficiency": n_real / offsets,
    }


__all__ = [
    "IGNORE_INDEX",
    "MAX_SEQ_LEN_PRESETS",
    "OVERLONG_POLICIES",
    "PackingStats",
    "resolve_max_seq_len",
    "check_overlong_policy",
    "pack_best_fit",
    "plan_packs",
    "truncate_sample",
    "collate_packed",
    "concat_packed",
]
