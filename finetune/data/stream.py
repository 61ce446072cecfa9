"""Streaming training sources (`data.train[].streaming: true`): rows read, rendered, masked and tokenized while
training runs, through `datasets`' iterable datasets, for sources too large to prepare up front.

The rules (the schema refuses the rest, naming the field):
- a stream has no length, so `train.max_steps` says how long to train; an **epoch** is one pass over the
  (mixed) stream, and when it ends the next pass starts again from its first row, in the same order, until
  `max_steps`. Rows are not shuffled (a shuffle buffer cannot be resumed exactly): shuffle the files beforehand;
- the rows become tokens and labels by the same functions as prepared data (`formats.to_sample`,
  `templates.segments`/`tokenize`, `prepare._fit`): the same trained tokens, the same bad-row rule
  (`data.on_bad_row`: a broken row stops the run naming its file and row, or is skipped);
- weighted sources are mixed by `datasets.interleave_datasets` with the weights as probabilities, `seed` and
  `data.mix_stop` as the stopping strategy;
- statistics (`finetune data`, `plan`, the manifest) are those of a **sample**: the stream's first
  `SAMPLE_ROWS` rows, as they would be trained, and say so (`stats.sample`);
- held-out rows come from `data.eval` sources, prepared whole as usual (a `split_ratio` cannot be drawn
  from a stream);
- `--resume` continues the exact row sequence: every checkpoint holds `stream_state.json`, the stream's
  `state_dict()` after the last row trained, written inside the checkpoint before it is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.data import sources
from finetune.data.formats import BadRow, Sample, to_sample
from finetune.data.prepare import (
    DataStats,
    PreparedData,
    SourceStats,
    _act_on_checks,
    _fit,
    _max_length,
    _nothing_left,
    check_slices,
    load_samples,
    record_lengths,
    record_rows,
)
from finetune.data.templates import segments, tokenize
from finetune.data.tokens import Tokens
from finetune.errors import DataError, Problem
from finetune.recipe.schema import DataSource, Recipe

if TYPE_CHECKING:
    from datasets import IterableDataset
    from transformers import PreTrainedTokenizerBase

SAMPLE_ROWS = 1000  # rows at the head of the stream that the statistics are computed on
STATE_FILE = "stream_state.json"  # in each checkpoint: rows trained and the stream's state after them


@dataclass
class StreamStats(DataStats):
    sample: dict[str, Any] = field(default_factory=dict)  # what the figures are a sample of


@dataclass
class StreamedData(PreparedData):
    sample_rows: Any = None  # the sample's tokenized rows (a Dataset), for `finetune data`'s examples


def is_streamed(recipe: Recipe) -> bool:
    return any(s.streaming for s in recipe.data.train)


def prepare_training_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """SFT's training data: streamed when the sources say so, else prepared up front (and cached)."""
    from finetune.data.prepare import prepare_data

    return prepare_stream(recipe, tokenizer) if is_streamed(recipe) else prepare_data(recipe, tokenizer)


def prepare_stream(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> StreamedData:
    """The endless training stream, the held-out set prepared whole, and the statistics of the stream's head."""
    d = recipe.data
    stats = StreamStats(sources=[_source_stats(s) for s in d.train])
    head = list(islice(raw_stream(recipe), SAMPLE_ROWS))
    train = _samples(head, list(d.train), d.on_bad_row, stats)
    if not train:
        raise DataError(_nothing_left(stats, 0))
    held_out = load_samples(list(d.eval), d.on_bad_row, stats, recipe.eval.slice_by) if d.eval else []
    check_slices(held_out, recipe.eval.slice_by)
    encoded = _encode(tokenizer, train, d.train_on)
    max_len = _max_length(recipe, encoded)
    _record_checks(recipe, tokenizer, train, held_out, encoded, max_len, stats)
    lengths = record_lengths(stats, encoded, max_len)
    eval_keys = {s.key() for s in held_out}
    stats.duplicates_train_eval = sum(s.key() in eval_keys for s in train)
    rows, kept = _fit(encoded, max_len, d.truncation, stats)
    if not len(rows):
        raise DataError(_nothing_left(stats, len(train)))
    eval_rows, eval_kept = _fit(_encode(tokenizer, held_out, d.train_on), max_len, d.truncation, DataStats())
    record_rows(stats, rows, eval_rows)
    stats.sample = _sample_note(recipe, len(head), train)
    return StreamedData(
        train=encoded_stream(recipe, tokenizer, max_len),
        eval=eval_rows.dataset() if len(eval_rows) else None,
        eval_samples=held_out,
        stats=stats,
        train_where=[train[i].where for i in kept],
        lengths=lengths,
        eval_kept=eval_kept,
        sample_rows=rows.dataset(),
    )


def _sample_note(recipe: Recipe, read: int, train: list[Sample]) -> dict[str, Any]:
    """What the statistics are of, in words and figures, with each source's share of the sample."""
    paths = [s.path for s in recipe.data.train]
    shares = [sum(s.source == k for s in train) for k in range(len(paths))]
    return {
        "rows_read": read,
        "limit": SAMPLE_ROWS,
        "note": f"statistics of a sample: the first {read} rows of the stream (at most {SAMPLE_ROWS}), not all of it",
        "sources": [{"path": p, "rows": n, "share": round(n / max(len(train), 1), 3)} for p, n in zip(paths, shares,
                                                                                                     strict=True)],
    }  # fmt: skip


def _source_stats(source: DataSource) -> SourceStats:
    return SourceStats(source.path, source.format, _fingerprint(source))


def _fingerprint(source: DataSource) -> str:
    """A local source's file contents (as prepared sources'); a hub stream's id, subset, split and revision only
    (nothing is downloaded; an unpinned revision is whatever the hub serves)."""
    if sources.is_local(source.path):
        return sources.fingerprint(source)
    material = [source.path, source.subset, source.split, source.revision]
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


def _samples(raw: list[dict], sources_: list[DataSource], on_bad_row: str, stats: DataStats) -> list[Sample]:
    """The raw rows as samples, each bad one stopped on or skipped and counted in its source's figures."""
    out = []
    for r in raw:
        sample = _sample(r, sources_[r["source"]], on_bad_row, stats.sources[r["source"]])
        if sample is not None:
            out.append(sample)
    return out


def _sample(raw: dict, source: DataSource, on_bad_row: str, entry: SourceStats | None) -> Sample | None:
    """One raw row as a sample (prepare.load_samples' rule, row by row); None for a skipped bad row."""
    try:
        if raw["problem"]:
            reason, message = json.loads(raw["problem"])
            raise BadRow(message, reason)
        sample = to_sample(json.loads(raw["row"]), raw["where"], source)
    except BadRow as e:
        if on_bad_row == "error":
            raise DataError(Problem(f"{e} (set data.on_bad_row: skip to skip such rows)", raw["where"])) from None
        if entry is not None:
            entry.skip(e.reason)
        return None
    if entry is not None:
        entry.rows += 1
    return replace(sample, source=raw["source"]) if raw["source"] else sample


def _encode(tokenizer: Any, samples: list[Sample], train_on: str) -> Tokens:
    """Render, mask and tokenize: the prepared path's template functions, unchanged."""
    return tokenize(tokenizer, [segments(tokenizer, s, train_on) for s in samples])


def _record_checks(recipe: Recipe, tokenizer: Any, train: list[Sample], held_out: list[Sample], encoded: Tokens,
                   max_len: int, stats: DataStats) -> None:  # fmt: skip
    """The data checks over the sample, as prepare records them (the schema refuses dedup and leakage drop/error
    with streaming, so no row is dropped); their one-line summary says it is a sample."""
    _act_on_checks(recipe, tokenizer, train, held_out, encoded, max_len, stats)
    stats.checks["summary"] = f"{stats.checks['summary']} (on a sample: the stream's first {len(train)} valid rows)"


# --- the stream itself ---------------------------------------------------------------------------------------


def raw_stream(recipe: Recipe) -> IterableDataset:
    """One pass over the training sources as raw rows {source, where, row (JSON), problem}: each source read by
    our own readers (the same rows, locations and bad-row reasons as prepared sources), then concatenated,
    or interleaved by weight."""
    from datasets import Features, IterableDataset, Value, concatenate_datasets, interleave_datasets

    features = Features({"source": Value("int32"), "where": Value("string"), "row": Value("string"),
                         "problem": Value("string")})  # fmt: skip
    parts = [IterableDataset.from_generator(_raw_rows, features=features, gen_kwargs={"source": s, "k": k})
             for k, s in enumerate(recipe.data.train)]  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    weights = [s.weight for s in recipe.data.train]
    if weights[0] is None:
        return concatenate_datasets(parts)
    total = sum(float(w or 0) for w in weights)
    return interleave_datasets(parts, probabilities=[float(w or 0) / total for w in weights], seed=recipe.seed,
                               stopping_strategy=recipe.data.mix_stop)  # fmt: skip


def _raw_rows(source: DataSource, k: int) -> Iterator[dict]:
    rows = sources.read_rows(source) if sources.is_local(source.path) else _hub_stream(source)
    for row in rows:
        problem = json.dumps(row.problem) if row.problem is not None else ""
        data = "" if row.problem is not None else json.dumps(row.data, ensure_ascii=False, default=str)
        yield {"source": k, "where": row.where, "row": data, "problem": problem}


def _hub_stream(source: DataSource) -> Iterator[sources.Row]:
    """A hub dataset read as a stream over HTTP (`load_dataset(..., streaming=True)`), at most `limit` rows."""
    import datasets

    try:
        stream = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision,
                                       streaming=True)  # fmt: skip
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        raise DataError(f"{source.path}: cannot stream split {source.split!r} ({e})") from None
    for i, row in enumerate(islice(stream, source.limit), 1):
        yield sources.Row(row, f"{source.path}[{source.split}]:row {i}")


def encoded_stream(recipe: Recipe, tokenizer: Any, max_len: int) -> IterableDataset:
    """The training rows as the trainer reads them: the raw stream repeated without end (`max_steps` ends
    training), each row rendered, masked, tokenized and cut to `max_len` as prepared rows are; rows skipped
    (bad, or nothing left to train on) are filtered out."""
    from datasets import Features, List, Value

    d = recipe.data
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int64"))})

    def encode(raw: dict) -> dict:
        sample = _sample(raw, d.train[raw["source"]], d.on_bad_row, None)
        if sample is None:
            return {"input_ids": [], "labels": []}
        rows, _ = _fit(_encode(tokenizer, [sample], d.train_on), max_len, d.truncation, DataStats())
        if not len(rows):
            return {"input_ids": [], "labels": []}
        ids, labels = rows[0]
        return {"input_ids": ids, "labels": labels}

    stream = raw_stream(recipe).repeat(None)
    stream = stream.map(encode, remove_columns=["source", "where", "row", "problem"], features=features)
    return stream.filter(lambda row: len(row["input_ids"]) > 0)


# --- exact resume --------------------------------------------------------------------------------------------


class Tracked(torch.utils.data.IterableDataset):
    """The trainer's view of a stream: each row yielded is remembered with the stream's `state_dict()` after it,
    so that a checkpoint can record the state after exactly the rows trained, although the data loader
    reads ahead of the steps (accelerate fetches one batch early). Starts from a checkpoint's state.

    `before_first()` runs once, just before the first row is handed over: a resumed run restores its RNG
    state there, after the data loader's iterator has drawn its base seed from it (which the killed run
    drew at step 0, not at the step it resumes from); transformers re-syncs its own skip the same way.
    """

    def __init__(self, dataset: IterableDataset, start: dict[str, Any] | None = None,
                 before_first: Callable[[], None] | None = None, keep: int = 4096) -> None:  # fmt: skip
        self.dataset, self.start = dataset, start or {"rows": 0, "state": None}
        self.before_first = before_first
        self.kept: deque[tuple[int, dict]] = deque(maxlen=keep)

    def __iter__(self) -> Iterator[dict]:
        if self.start["state"] is not None:
            self.dataset.load_state_dict(self.start["state"])
        n = self.start["rows"]
        for row in self.dataset:
            n += 1
            self.kept.append((n, self.dataset.state_dict()))
            if self.before_first is not None:
                self.before_first()
                self.before_first = None
            yield row

    def position(self, rows: int) -> dict[str, Any]:
        """{rows, state}: the stream after `rows` rows were trained, for the checkpoint."""
        if rows == self.start["rows"]:
            return self.start
        for n, state in self.kept:
            if n == rows:
                return {"rows": rows, "state": state}
        raise RuntimeError(f"the stream's state after row {rows} is not kept (rows {self.kept[0][0]}.."
                           f"{self.kept[-1][0]} are): raise Tracked.keep")  # fmt: skip


def save_position(tracked: Tracked, rows: int, checkpoint: str | Path) -> None:
    """Write the stream's position into a checkpoint being saved (still in its staging folder)."""
    from finetune.files import write_json_atomic

    write_json_atomic(Path(checkpoint) / STATE_FILE, tracked.position(rows))


def load_position(checkpoint: str | Path | None, rows: int) -> dict[str, Any] | None:
    """The position a checkpoint recorded; it must be after the `rows` its steps trained."""
    if checkpoint is None:
        return None
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise DataError(Problem("no stream state in this checkpoint (not saved by a streaming run?): start "
                                "afresh with --overwrite", str(path.parent)))  # fmt: skip
    position = json.loads(path.read_text(encoding="utf-8"))
    if position.get("rows") != rows:
        raise DataError(Problem(f"stream state after {position.get('rows')} rows, but its {rows} trained rows "
                                "differ: a damaged checkpoint", str(path)))  # fmt: skip
    return position
