"""From a recipe's data section to tokenized train/eval sets with labels, and the figures about them.

Nothing is dropped silently: skipped rows, truncated and dropped sequences, and train/eval
duplicates are counted in `DataStats`, which the run's manifest and summary report.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.data import sources
from finetune.data.formats import BadRow, Sample, to_sample
from finetune.data.templates import IGNORE, apply_chat_template, segments, tokenize
from finetune.errors import DataError, Problem
from finetune.recipe import DataSource, Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


@dataclass
class SourceStats:
    path: str
    format: str
    sha256: str
    rows: int = 0
    skipped: int = 0


@dataclass
class DataStats:
    sources: list[SourceStats] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    duplicates_train_eval: int = 0
    max_seq_length: int = 0
    truncated: int = 0
    dropped: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)  # of training rows, before truncation
    over_max_seq_length: int = 0
    suggested_max_seq_length: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    eval_samples: list[Sample]
    stats: DataStats
    train_where: list[str] = field(default_factory=list)  # origin (file:line) of each training row kept
    lengths: list[int] = field(default_factory=list)  # token length of every training row, before truncation


def load_samples(sources_: list[DataSource], on_bad_row: str, stats: DataStats) -> list[Sample]:
    """All rows of the sources as samples; a bad row raises DataError naming it, or is skipped and counted."""
    samples: list[Sample] = []
    for source in sources_:
        entry = SourceStats(source.path, source.format, sources.fingerprint(source))
        stats.sources.append(entry)
        for row in sources.read_rows(source):
            try:
                samples.append(to_sample(row.data, row.where, source))
                entry.rows += 1
            except BadRow as e:
                if on_bad_row == "error":
                    raise DataError(Problem(f"{e} (set data.on_bad_row: skip to skip such rows)", row.where)) from None
                entry.skipped += 1
    return samples


def split(recipe: Recipe, stats: DataStats) -> tuple[list[Sample], list[Sample]]:
    """Train and eval samples: explicit eval sources, or a seeded `split_ratio` of the training rows."""
    data = recipe.data
    train = load_samples(list(data.train), data.on_bad_row, stats)
    if data.eval is None:
        return train, []
    if isinstance(data.eval, list):
        return train, load_samples(list(data.eval), data.on_bad_row, stats)
    order = list(range(len(train)))
    random.Random(recipe.seed).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval.split_ratio))
    if n_eval >= len(train):
        raise DataError(f"data.eval.split_ratio {data.eval.split_ratio} leaves no training rows out of {len(train)}")
    held = set(order[:n_eval])
    return [s for i, s in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Validate, split, render, tokenize and mask the recipe's data."""
    from datasets import Dataset

    apply_chat_template(tokenizer, recipe.data.chat_template)
    stats = DataStats()
    train, held_out = split(recipe, stats)
    eval_keys = {s.key() for s in held_out}
    stats.duplicates_train_eval = sum(s.key() in eval_keys for s in train)
    encoded_train = _encode(tokenizer, train, recipe.data.train_on)
    encoded_eval = _encode(tokenizer, held_out, recipe.data.train_on)
    max_len = _max_length(recipe, encoded_train)
    stats.max_seq_length = max_len
    lengths = sorted(len(ids) for ids, _ in encoded_train)
    stats.length_percentiles = {f"p{q}": percentile(lengths, q) for q in (50, 95, 99)} | {
        "max": lengths[-1] if lengths else 0
    }
    stats.over_max_seq_length = sum(n > max_len for n in lengths)
    stats.suggested_max_seq_length = _round_up(stats.length_percentiles["p99"])
    train_rows, kept = _fit(encoded_train, max_len, recipe.data.truncation, stats)
    eval_rows, _ = _fit(encoded_eval, max_len, recipe.data.truncation, DataStats())
    if not train_rows:
        raise DataError("no training rows left after validation and truncation")
    stats.train_rows, stats.eval_rows = len(train_rows), len(eval_rows)
    stats.train_tokens = sum(len(ids) for ids, _ in train_rows)
    stats.trained_tokens = sum(sum(label != IGNORE for label in labels) for _, labels in train_rows)

    def as_dataset(rows: list[tuple[list[int], list[int]]]) -> Dataset:
        return Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})

    return PreparedData(
        as_dataset(train_rows),
        as_dataset(eval_rows) if eval_rows else None,
        held_out,
        stats,
        train_where=[train[i].where for i in kept],
        lengths=lengths,
    )


def _encode(
    tokenizer: PreTrainedTokenizerBase, samples: list[Sample], train_on: str
) -> list[tuple[list[int], list[int]]]:
    out = []
    for start in range(0, len(samples), 1000):
        batch = [segments(tokenizer, s, train_on) for s in samples[start : start + 1000]]
        out += tokenize(tokenizer, batch)
    return out


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def _round_up(n: int) -> int:
    return max(64, math.ceil(n / 64) * 64)


def _max_length(recipe: Recipe, encoded: list[tuple[list[int], list[int]]]) -> int:
    """The recipe's max_seq_length, or for `auto` the 95th percentile of lengths rounded up to a multiple of 64."""
    if recipe.data.max_seq_length != "auto":
        return recipe.data.max_seq_length
    return _round_up(percentile(sorted(len(ids) for ids, _ in encoded), 95))


def _fit(rows: list[tuple[list[int], list[int]]], max_len: int, mode: str, stats: DataStats) -> tuple[list, list[int]]:
    """Truncate or drop rows over max_len, counting both; rows left with nothing to train on are dropped.

    Returns the rows kept and their indices in `rows`.
    """
    out, kept = [], []
    for i, (ids, labels) in enumerate(rows):
        if len(ids) > max_len:
            if mode == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels):
            stats.dropped += 1
            continue
        out.append((ids, labels))
        kept.append(i)
    return out, kept
