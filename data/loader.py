"""A stateful, resumable loader of packed batches.

Each epoch draws a seeded permutation of the data set. The permutation is consumed in
buffers of `buffer_size * world_size` samples; every buffer is packed best-fit-decreasing
(data.packing) and its packs are dealt to the ranks in groups of `world_size *
micro_batch_packs`, so every rank gets the same number of batches (no rank waits for
another at the end of an epoch) and no sample goes to two ranks. Every rank computes the
same global plan from the lengths alone (cheap) and reads only its own samples.

Packs that cannot fill a whole group, and the least-filled packs of a buffer (below
`refill_below` of capacity), are not emitted: their samples go back into the next buffer
and are packed again with fresh samples. That is what lifts packing efficiency from
~97% (per-buffer BFD) to >99% without a huge buffer. At the end of an epoch what is
left is emitted; if it does not fill a group, `drop_last` drops it (counted in
`stats.n_tail_dropped`) or, without drop_last, the group is completed with empty
(all-padding) packs so that every sample is seen exactly once.

Resume: all randomness derives from (seed, epoch, buffer number), so the loop state is a
few integers plus the not-yet-emitted packs of the current buffer and the carried-over
samples, all plain JSON. A loader restored with load_state_dict yields exactly the batch
the saved one would have yielded next, without replaying data. State is global (the same
on every rank), so saving it from rank 0 alone is enough.

The loader is single-process and synchronous on purpose: state_dict() taken after a batch
is consumed always describes the next batch. Reading cached codes is memory-mapped and
far faster than a training step.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterator, Protocol

import numpy as np

from data.packing import (
    PackingStats,
    check_overlong_policy,
    collate_packed,
    concat_packed,
    pack_best_fit,
    truncate_sample,
)
from data.vocab import ENDOFTEXT_ID, IMAGE_PAD_ID
from viq.errors import CheckpointError, ConfigError, DataError

STATE_VERSION = 1


class LengthDataset(Protocol):
    def __len__(self) -> int: ...

    def length(self, index: int) -> int:
        """Token length of sample `index`, without building it (must equal len(input_ids))."""

    def __getitem__(self, index: int) -> dict: ...


class PackedLoader:
    """Packed batches for one rank; see the module docstring.

    `stats` (PackingStats) and `n_tail_dropped` count the global plan (all ranks' packs),
    so they read the same on every rank.

    Each batch is data.packing.concat_packed over `micro_batch_packs` packs, i.e. one row
    [1, micro_batch_packs * capacity] (when padding to capacity) with cu_seqlens, plus
    `sample_indices` (data set indices in row order) and `epoch`.
    """

    def __init__(
        self,
        dataset: LengthDataset,
        capacity: int,
        *,
        buffer_size: int = 2048,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        micro_batch_packs: int = 1,
        overlong: str = "truncate",
        drop_last: bool = True,
        refill_below: float = 0.995,
        pad_to_capacity: bool = True,
        pad_id: int = ENDOFTEXT_ID,
        image_pad_id: int = IMAGE_PAD_ID,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if capacity < 1 or buffer_size < 1 or micro_batch_packs < 1:
            raise ConfigError(
                f"capacity ({capacity}), buffer_size ({buffer_size}) and micro_batch_packs ({micro_batch_packs}) must be >= 1"
            )
        if not 0.0 <= refill_below <= 1.0:
            raise ConfigError(f"refill_below must be a fill fraction in [0, 1], got {refill_below}")
        self.dataset = dataset
        self.capacity = int(capacity)
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_packs = micro_batch_packs
        self.overlong = check_overlong_policy(overlong)
        self.drop_last = drop_last
        self.refill_below = float(refill_below)
        self.pad_to_capacity = pad_to_capacity
        self.pad_id = pad_id
        self.image_pad_id = image_pad_id
        self.group = world_size * micro_batch_packs
        n = len(dataset)
        # One pass over the cheap lengths; the whole plan is computed from them.
        self.lengths = np.fromiter((dataset.length(i) for i in range(n)), dtype=np.int64, count=n)
        if n and int(self.lengths.min()) < 1:
            bad = int(np.argmin(self.lengths))
            raise ValueError(f"dataset.length({bad}) = {int(self.lengths[bad])}; every sample needs at least one token")
        # Where supervision starts: an over-long sample cut before it would train on nothing (a NaN step).
        first = getattr(dataset, "first_supervised", None)
        self.first_supervised = (np.fromiter((first(i) for i in range(n)), dtype=np.int64, count=n) if first
                                 else np.zeros(n, dtype=np.int64))
        self._lengths_crc = zlib.crc32(self.lengths.tobytes())
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._steps_cache: dict[int, int] = {}
        self.stats = PackingStats(capacity=self.capacity)
        self.n_tail_dropped = 0
        self._reset_epoch(0)

    # ------------------------------------------------------------------ planning

    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._cursor = 0  # position in this epoch's permutation of the next fresh sample
        self._buffer_index = 0  # buffers planned so far this epoch (seeds the pack order)
        self._carry: list[int] = []  # samples returned from the last buffer, to be packed again
        self._pending: list[list[int]] = []  # global packs of the current buffer not yet emitted

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(len(self.lengths)))
        return self._perm_cache[1]

    def _effective_length(self, i: int) -> int:
        return min(int(self.lengths[i]), self.capacity)

    def _plan_buffer(self, epoch: int, cursor: int, buffer_index: int, carry: list[int]) -> tuple[list[list[int]], int, list[int], dict]:
        """Pack the next buffer. Returns (packs to emit, new cursor, new carry, counters)."""
        perm = self._permutation(epoch)
        fresh = perm[cursor : cursor + self.buffer_size * self.world_size].tolist()
        cursor += len(fresh)
        counts = {"n_samples": len(fresh), "n_truncated": 0, "n_dropped": 0, "n_unsupervised": 0, "n_tail_dropped": 0}
        items = list(carry)
        for i in fresh:
            if self.lengths[i] > self.capacity:
                if self.overlong == "drop":
                    counts["n_dropped"] += 1
                    continue
                if self.first_supervised[i] >= self.capacity:
                    counts["n_unsupervised"] += 1
                    continue
                counts["n_truncated"] += 1
            items.append(i)
        lengths = [self._effective_length(i) for i in items]
        packs = [[items[j] for j in pack] for pack in pack_best_fit(lengths, self.capacity)]
        fills = [sum(self._effective_length(i) for i in pack) for pack in packs]
        # Least-filled first; ties by position so the choice is deterministic.
        by_fill = sorted(range(len(packs)), key=lambda p: (fills[p], p))
        epoch_end = cursor >= len(perm)
        if not epoch_end:
            n_under = sum(1 for f in fills if f < self.refill_below * self.capacity)
            # Keep at least half of the buffer's packs so carried samples cannot pile up.
            n_back = min(n_under, len(packs) // 2)
            n_back += (len(packs) - n_back) % self.group
            back = set(by_fill[:n_back])
            carry = [i for p in sorted(back) for i in packs[p]]
            packs = [pack for p, pack in enumerate(packs) if p not in back]
        else:
            carry = []
            n_left = len(packs) % self.group
            if n_left and self.drop_last:
                tail = set(by_fill[:n_left])
                counts["n_tail_dropped"] = sum(len(packs[p]) for p in tail)
                packs = [pack for p, pack in enumerate(packs) if p not in tail]
            elif n_left:
                packs = packs + [[] for _ in range(self.group - n_left)]
        # BFD emits its fullest packs first; shuffle so batch order carries no length trend.
        order = np.random.default_rng([self.seed, epoch, buffer_index]).permutation(len(packs))
        return [packs[p] for p in order], cursor, carry, counts

    def _advance_plan(self) -> bool:
        """Plan buffers until there are packs to emit; False when the epoch is exhausted."""
        n = len(self.lengths)
        while not self._pending:
            if self._cursor >= n and not self._carry:
                return False
            packs, self._cursor, self._carry, counts = self._plan_buffer(self.epoch, self._cursor, self._buffer_index, self._carry)
            self._buffer_index += 1
            self._pending = packs
            self.stats.n_samples += counts["n_samples"]
            self.stats.n_truncated += counts["n_truncated"]
            self.stats.n_dropped += counts["n_dropped"]
            self.stats.n_unsupervised += counts["n_unsupervised"]
            self.n_tail_dropped += counts["n_tail_dropped"]
        return True

    def plan_epoch(self, epoch: int | None = None) -> tuple[list[list[int]], PackingStats]:
        """Dry run: every pack of an epoch (all ranks, emission order) and its packing stats.

        Uses the lengths only and leaves the loader's position untouched.
        """
        epoch = self.epoch if epoch is None else epoch
        stats = PackingStats(capacity=self.capacity)
        cursor, buffer_index, carry, all_packs = 0, 0, [], []
        while cursor < len(self.lengths) or carry:
            packs, cursor, carry, counts = self._plan_buffer(epoch, cursor, buffer_index, carry)
            buffer_index += 1
            all_packs.extend(packs)
            stats.n_samples += counts["n_samples"]
            stats.n_truncated += counts["n_truncated"]
            stats.n_dropped += counts["n_dropped"]
            stats.n_unsupervised += counts["n_unsupervised"]
        stats.n_packs = len(all_packs)
        stats.n_real_tokens = sum(self._effective_length(i) for pack in all_packs for i in pack)
        return all_packs, stats

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in the current epoch, from a dry run of the plan over the lengths.

        Exact for the current epoch; other epochs' permutations differ by a fraction of a
        percent. Cached per epoch.
        """
        if self.epoch not in self._steps_cache:
            self._steps_cache[self.epoch] = len(self.plan_epoch()[0]) // self.group
        return self._steps_cache[self.epoch]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def estimate_steps_per_epoch(self, efficiency: float = 0.99) -> int:
        """Quick estimate without planning: total tokens / (capacity * efficiency * group)."""
        tokens = int(np.minimum(self.lengths, self.capacity).sum())
        return math.ceil(tokens / (self.capacity * efficiency * self.group))

    # ------------------------------------------------------------------ iteration

    def _fetch(self, index: int) -> dict:
        sample = self.dataset[index]
        n = int(sample["input_ids"].numel())
        if n != int(self.lengths[index]):
            raise ValueError(f"dataset.length({index}) = {int(self.lengths[index])} but dataset[{index}] has {n} tokens; they must agree")
        if n > self.capacity:
            sample = truncate_sample(sample, self.capacity, self.image_pad_id)
        return sample

    def _collate(self, pack: list[int]) -> dict:
        samples = [self._fetch(i) for i in pack]
        # An empty pack (end-of-epoch filler) is all padding, so it always has capacity tokens.
        pad = self.pad_to_capacity or not samples
        return collate_packed(samples, self.capacity, pad_to_capacity=pad, pad_id=self.pad_id, image_pad_id=self.image_pad_id)

    def next_batch(self) -> dict | None:
        """The next batch of this rank, or None at the end of the epoch (which then advances)."""
        if not self._advance_plan():
            self._reset_epoch(self.epoch + 1)
            return None
        group, self._pending = self._pending[: self.group], self._pending[self.group :]
        self.stats.n_packs += len(group)
        self.stats.n_real_tokens += sum(self._effective_length(i) for pack in group for i in pack)
        mine = group[self.rank * self.micro_batch_packs : (self.rank + 1) * self.micro_batch_packs]
        batch = concat_packed([self._collate(pack) for pack in mine])
        batch["sample_indices"] = [i for pack in mine for i in pack]
        batch["epoch"] = self.epoch
        return batch

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; iterating again continues with the next epoch."""
        while (batch := self.next_batch()) is not None:
            yield batch

    def iter_forever(self) -> Iterator[dict]:
        """Batches across epochs without end (the trainer stops at max_steps)."""
        empty_epochs = 0
        while True:
            batch = self.next_batch()
            if batch is None:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise DataError("the loader produced no batch in a whole epoch: every sample was dropped or the data set is empty")
                continue
            empty_epochs = 0
            yield batch

    # ------------------------------------------------------------------ state

    def _config_fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "capacity": self.capacity,
            "buffer_size": self.buffer_size,
            "world_size": self.world_size,
            "micro_batch_packs": self.micro_batch_packs,
            "overlong": self.overlong,
            "drop_last": self.drop_last,
            "refill_below": self.refill_below,
            "n_samples": len(self.lengths),
            "lengths_crc32": self._lengths_crc,
        }

    def state_dict(self) -> dict:
        """Plain-JSON loop state: the next batch after restoring is the next batch now."""
        return {
            "version": STATE_VERSION,
            "config": self._config_fingerprint(),
            "epoch": self.epoch,
            "cursor": self._cursor,
            "buffer_index": self._buffer_index,
            "carry": [int(i) for i in self._carry],
            "pending": [[int(i) for i in pack] for pack in self._pending],
            "stats": self.stats.to_dict(),
            "n_tail_dropped": self.n_tail_dropped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                                  "this checkpoint was written by another version of the loader")
        mine = self._config_fingerprint()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise CheckpointError(
                    f"loader state was saved with {key}={value!r} but this loader has {key}={mine.get(key)!r}; "
                    "resume with the same data and loader settings"
                )
        self.epoch = int(state["epoch"])
        self._cursor = int(state["cursor"])
        self._buffer_index = int(state["buffer_index"])
        self._carry = [int(i) for i in state["carry"]]
        self._pending = [[int(i) for i in pack] for pack in state["pending"]]
        self.stats = PackingStats.from_dict(state["stats"])
        self.n_tail_dropped = int(state["n_tail_dropped"])


__all__ = ["PackedLoader", "LengthDataset", "STATE_VERSION"]
