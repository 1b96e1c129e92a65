"""Tokenised examples -> fixed-shape training rows (padded or packed) and the deterministic,
sharded, resumable iterator over their batches."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medusa_jax.errors import DataError
from medusa_jax.training.data.sources import DataReport
from medusa_jax.training.data.tokenisation import tokenize_conversations

# --------------------------------------------------------------------------------------------
# Fixed-shape arrays
# --------------------------------------------------------------------------------------------


def choose_seq_len(lengths: Iterable[int], max_len: int, multiple: int = 128) -> int:
    """Smallest multiple of ``multiple`` covering the longest example, capped at ``max_len``.

    Keeps the number of distinct compiled shapes small across datasets.
    """
    longest = max(lengths, default=1)
    return int(min(max_len, -(-max(longest, 1) // multiple) * multiple))


def pack_or_pad(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    mode: str = "pad",
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Lay ``(input_ids, loss_mask)`` examples out as fixed-length rows.

    ``mode="pad"``: one example per row. ``mode="pack"``: several examples per row (best-fit
    in input order, deterministic). Examples longer than ``seq_len`` keep their first tokens;
    empty ones are dropped. Returns int32 arrays, each ``[N, seq_len]``:

    - ``input_ids`` (``pad_id`` on padding), ``loss_mask`` (0 on padding),
    - ``segment_ids``: 1, 2, ... per example within a row, 0 on padding,
    - ``positions``: 0-based position within its own example, 0 on padding.

    With packing, attention and shifted targets must stay within one segment (compare
    ``segment_ids``); a row's first segment token is a template header with mask 0.
    """
    if mode not in ("pad", "pack"):
        raise ValueError(f"mode must be 'pad' or 'pack', got {mode!r}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    items = []
    for ids, mask in examples:
        ids = np.asarray(ids, np.int32)[:seq_len]
        mask = np.asarray(mask, np.int32)[:seq_len]
        if ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and loss_mask {mask.shape} differ in length")
        if len(ids):
            items.append((ids, mask))

    rows: list[list[int]] = []
    if mode == "pad":
        rows = [[i] for i in range(len(items))]
    else:
        free: list[tuple[int, int]] = []  # sorted (remaining capacity, row)
        for i, (ids, _) in enumerate(items):
            n = len(ids)
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                cap, r = free.pop(k)
                rows[r].append(i)
            else:
                cap, r = seq_len, len(rows)
                rows.append([i])
            if cap - n > 0:
                bisect.insort(free, (cap - n, r))

    shape = (len(rows), seq_len)
    out = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = items[i]
            n = len(ids)
            out["input_ids"][r, at : at + n] = ids
            out["loss_mask"][r, at : at + n] = mask
            out["segment_ids"][r, at : at + n] = seg
            out["positions"][r, at : at + n] = np.arange(n, dtype=np.int32)
            at += n
    return out


def prepare_arrays(
    tokenizer: Any,
    conversations: Iterable[list[dict[str, str]]],
    seq_len: int,
    mode: str = "pad",
    report: DataReport | None = None,
) -> dict[str, np.ndarray]:
    """Tokenise conversations and lay them out with :func:`pack_or_pad` (``[N, seq_len]``)."""
    examples = tokenize_conversations(tokenizer, conversations, seq_len, report=report)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    return pack_or_pad(examples, seq_len, mode=mode, pad_id=int(pad_id))


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


class BatchIterator:
    """Deterministic, shardable, resumable iterator over rows of equal-length arrays.

    Every epoch visits the rows in a permutation derived from ``(seed, epoch)`` only. Each
    global batch of ``batch_size`` rows is split into ``process_count`` contiguous shards and
    this process yields shard ``process_index`` (``batch_size // process_count`` rows).
    Iteration runs over epochs until ``num_epochs`` (None = forever).

    With ``drop_last=False`` the last, partial global batch is filled up to full size so shapes
    stay static; batches then carry a ``valid [B_local] bool`` entry, and filler rows also have
    ``loss_mask`` zeroed if present.

    ``state()`` is a JSON-serialisable position; ``restore(state)`` continues exactly where an
    uninterrupted iterator would.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        drop_last: bool = True,
        *,
        num_epochs: int | None = None,
    ):
        if not arrays:
            raise ValueError("arrays is empty")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"arrays must share a leading dimension, got {sizes}")
        self.num_examples = int(next(iter(sizes.values())))
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be positive and divisible by "
                f"process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // process_count
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.drop_last = bool(drop_last)
        self.num_epochs = num_epochs
        if drop_last:
            self.batches_per_epoch = self.num_examples // self.batch_size
        else:
            self.batches_per_epoch = -(-self.num_examples // self.batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.num_examples} examples cannot fill one batch of {self.batch_size} "
                "with drop_last=True"
            )
        self._epoch = 0
        self._index = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, np.int64)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> BatchIterator:
        return self

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, epoch: int, index: int) -> np.ndarray:
        """Row ids ``[batch_size]`` of global batch ``index`` of ``epoch``; -1 marks filler."""
        perm = self._permutation(epoch)
        idx = perm[index * self.batch_size : (index + 1) * self.batch_size]
        if len(idx) < self.batch_size:
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), -1, idx.dtype)])
        return idx

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        idx = self.global_indices(self._epoch, self._index)
        lo = self.process_index * self.local_batch_size
        idx = idx[lo : lo + self.local_batch_size]
        valid = idx >= 0
        take = np.where(valid, idx, 0)
        batch = {k: v[take] for k, v in self.arrays.items()}
        if not self.drop_last:
            batch["valid"] = valid
            if "loss_mask" in batch and not valid.all():
                batch["loss_mask"][~valid] = 0
        self._index += 1
        if self._index >= self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """Position of the next batch plus the settings it is only valid for."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
        }

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a :meth:`state`; raises ValueError if it belongs to other data/settings."""
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(
                    f"iterator state has {key}={state[key]} but this iterator has "
                    f"{key}={getattr(self, key)}"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise DataError(
                f"iterator state epoch={epoch} index={index} is out of range "
                f"({self.batches_per_epoch} batches per epoch)"
            )
        self._epoch, self._index = epoch, index
