"""Tokenized rows held flat: every row's ids and labels in two arrays, with each row's start.

100,000 rows are ~19M tokens: as Python lists of ints, every pass over them (pickling from the encoding workers,
fitting to max_seq_length, counting trained tokens, converting to arrow) cost seconds; as arrays each is one
vectorised call, and arrow takes them without a copy per token. Iterating gives (ids, labels) lists, as before.
Ids and labels are int32 (a token id or IGNORE): half the memory an int64 copy moves, and the type arrow keeps
input ids in.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

IGNORE = -100  # the label of a token nothing is trained on (transformers' ignore index)


@dataclass(frozen=True, eq=False)
class Tokens:
    """Row i is `ids[starts[i]:starts[i + 1]]` with its labels (IGNORE where nothing is trained)."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    starts: np.ndarray  # int64, one more than the rows

    @classmethod
    def empty(cls) -> Tokens:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))

    @classmethod
    def of(cls, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Tokens:
        """From (ids, labels) pairs."""
        lengths = [len(ids) for ids, _ in rows]
        flat = [[t for ids, _ in rows for t in ids], [t for _, labels in rows for t in labels]]
        return cls(*(np.array(f, np.int32) for f in flat), starts_of(np.array(lengths, np.int64)))

    @classmethod
    def concat(cls, parts: Sequence[Tokens]) -> Tokens:
        if not parts:
            return cls.empty()
        lengths = np.concatenate([p.lengths() for p in parts])
        return cls(
            np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]), starts_of(lengths)
        )

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokens):
            return NotImplemented
        return all(np.array_equal(a, b) for a, b in ((self.ids, other.ids), (self.labels, other.labels),
                                                       (self.starts, other.starts)))  # fmt: skip

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        a, b = self.starts[i], self.starts[i + 1]
        return self.ids[a:b].tolist(), self.labels[a:b].tolist()

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        ids, labels, starts = self.ids.tolist(), self.labels.tolist(), self.starts.tolist()
        for a, b in itertools.pairwise(starts):
            yield ids[a:b], labels[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    @functools.cached_property
    def _trained(self) -> np.ndarray:
        """Trained tokens of each whole row: one sum per row over the flat mask (a cumulative sum of 19M tokens
        costs ten times as much, most of it faulting in its fresh output)."""
        out = np.zeros(len(self), np.int64)
        rows = np.flatnonzero(self.lengths() > 0)  # strictly increasing starts, each below the end: what reduceat needs
        if len(rows):
            mask = (self.labels != IGNORE).view(np.int8)
            out[rows] = np.add.reduceat(mask, self.starts[rows], dtype=np.int64)
        out.flags.writeable = False  # cached: shared by every caller
        return out

    def trained(self, within: int | None = None) -> np.ndarray:
        """Trained tokens of each row (of its first `within` tokens)."""
        if within is None or not len(self) or self.lengths().max() <= within:
            return self._trained
        counted = np.concatenate([[0], np.cumsum(self.labels != IGNORE)])
        ends = np.minimum(self.starts[1:], self.starts[:-1] + within)
        return counted[ends] - counted[self.starts[:-1]]

    def select(self, rows: Sequence[int] | np.ndarray, max_len: int | None = None) -> Tokens:
        """These rows, in this order (repeats allowed), each cut to its first `max_len` tokens."""
        rows = np.asarray(rows, np.int64)
        lengths = self.lengths()[rows]
        if (
            len(rows) == len(self)
            and np.array_equal(rows, np.arange(len(self)))
            and (max_len is None or not len(rows) or lengths.max() <= max_len)
        ):
            return self  # every row, whole: the arrays are never written, so they are shared, not copied
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        starts = starts_of(lengths)
        where = np.repeat(self.starts[:-1][rows] - starts[:-1], lengths) + np.arange(starts[-1])
        return Tokens(self.ids[where], self.labels[where], starts)

    def dataset(self) -> Dataset:
        """The rows as a Dataset with int32 input ids and int64 labels (the types `Dataset.from_dict` infers from
        lists of ids and labels), built from the arrays: no Python object per token. Its fingerprint is a hash of
        the arrays: `datasets` would otherwise pickle the whole table to hash it (a second per 100k rows)."""
        import pyarrow as pa
        from datasets import Dataset
        from datasets.table import InMemoryTable

        offsets = pa.array(self.starts.astype(np.int32))
        table = pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(self.ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(self.labels.astype(np.int64))),
        })  # fmt: skip
        digest = hashlib.sha1(usedforsecurity=False)
        for array in (self.ids, self.labels, self.starts):
            digest.update(np.ascontiguousarray(array))
        return Dataset(InMemoryTable(table), fingerprint=digest.hexdigest()[:16])


def starts_of(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Each row's start in the flat arrays, and the end of the last, from the rows' lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
