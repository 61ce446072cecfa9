"""From a recipe's data section to tokenized train/eval sets with labels, and the figures about them.

Nothing is dropped silently: skipped rows, truncated and dropped sequences, and train/eval
duplicates are counted in `DataStats`, which the run's manifest and summary report.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from finetune.data import checks, sources
from finetune.data.formats import BadRow, Judged, Sample, to_sample
from finetune.data.templates import Renderer, recipe_template, sample_segments, tokenize
from finetune.data.tokens import Tokens
from finetune.errors import DataError, Problem, WriteError
from finetune.recipe.schema import DataSource, Recipe

Row = TypeVar("Row")  # a sample, or a group of judged completions (data.preference)

CACHE_VERSION = 4  # bump when preprocessing changes what it produces
CHUNK = 1000
PARALLEL_MIN_ROWS = 4000

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
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # e.g. {"not_utf8": 2, "unknown_role": 1}

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1


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
    checks: dict[str, Any] = field(default_factory=dict)  # data/checks.py findings, before any row is dropped
    mix: dict[str, Any] = field(default_factory=dict)  # weighted sources: stop rule, per-source figures

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
    # for each row of `eval` (the loss rows), the index of its sample in `eval_samples`: a row cut by max_seq_length
    # has none, so this is how a loss row finds its slice and its prompt in eval/examples.jsonl
    eval_kept: list[int] = field(default_factory=list)


def load_samples(
    sources_: list[DataSource], on_bad_row: str, stats: DataStats, slice_by: str | None = None
) -> list[Sample]:
    """All rows of the sources as samples; a bad row raises DataError naming it, or is skipped and counted.

    Each sample carries its slice: the source's `slice:`, else the row's `slice_by` column (`eval.slice_by`)."""
    samples: list[Sample] = []
    for k, source in enumerate(sources_):
        entry = SourceStats(source.path, source.format, sources.fingerprint(source))
        stats.sources.append(entry)
        for row in sources.read_rows(source):
            try:
                if row.problem is not None:
                    raise BadRow(row.problem[1], row.problem[0])
                sample = to_sample(row.data, row.where, source)
                name = source.slice or _slice_of(row.data, slice_by)
                if name is not None:
                    sample = replace(sample, slice=name)
                samples.append(sample if k == 0 else replace(sample, source=k))
                entry.rows += 1
            except BadRow as e:
                if on_bad_row == "error":
                    raise DataError(Problem(f"{e} (set data.on_bad_row: skip to skip such rows)", row.where)) from None
                entry.skip(e.reason)
    return samples


def _slice_of(row: Any, column: str | None) -> str | None:
    if column is None or not isinstance(row, dict) or row.get(column) is None:
        return None
    return str(row[column])


def split(recipe: Recipe, stats: DataStats) -> tuple[list[Sample], list[Sample]]:
    """Train and eval samples: explicit eval sources, or a seeded `split_ratio` of the training rows."""
    data, by = recipe.data, recipe.eval.slice_by
    train = load_samples(list(data.train), data.on_bad_row, stats, by)
    if not train:
        raise DataError(_nothing_left(stats, 0))
    train, held_out = hold_out(
        recipe, train, lambda eval_sources: load_samples(eval_sources, data.on_bad_row, stats, by)
    )
    check_slices(held_out, by)
    return train, held_out


def check_slices(held_out: Sequence[Sample | Judged], slice_by: str | None) -> None:
    """With `eval.slice_by`, every held-out row names its slice: the first rows without one, located."""
    missing = [s.where for s in held_out if s.slice is None] if slice_by else []
    if missing:
        message = (f"eval.slice_by: no column {slice_by!r} in this held-out row ({len(missing)} of {len(held_out)} "
                   "rows lack it); give every held-out row that column, or its source a `slice:`")  # fmt: skip
        raise DataError([Problem(message, where) for where in missing[:5]])


def hold_out(
    recipe: Recipe, train: list[Row], load: Callable[[list[DataSource]], list[Row]]
) -> tuple[list[Row], list[Row]]:
    """(train, held-out) rows: `data.eval`'s own sources read by `load`, or a `split_ratio` of `train` drawn with
    the recipe's seed (kept in file order on both sides). Every method splits its rows (samples, pairs) this way."""
    data = recipe.data
    if data.eval is None:
        return train, []
    if isinstance(data.eval, list):
        return train, load(list(data.eval))
    order = list(range(len(train)))
    random.Random(recipe.seed).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval.split_ratio))
    if n_eval >= len(train):
        raise DataError(f"data.eval.split_ratio {data.eval.split_ratio} leaves no training rows out of {len(train)}")
    held = set(order[:n_eval])
    return [row for i, row in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, use_cache: bool = True) -> PreparedData:
    """Validate, split, render, tokenize and mask the recipe's data; reuse a cached result with the same key.

    The key covers the content of every source file, the tokenizer, the chat template, the data
    settings and the seed: an edited file or another tokenizer is never served stale data.
    """
    recipe_template(recipe, tokenizer)
    if not use_cache:
        return _prepare(recipe, tokenizer)
    key = cache_key(recipe, tokenizer)
    cached = _load_cached(key)
    if cached is not None:
        return cached
    prepared = _prepare(recipe, tokenizer)
    _store(key, prepared)
    return prepared


def _prepare(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    stats = DataStats()
    train, held_out = split(recipe, stats)
    eval_keys = {s.key() for s in held_out}
    stats.duplicates_train_eval = sum(s.key() in eval_keys for s in train)
    texts = functools.partial(checks.text_checks, train, held_out, list(tokenizer.all_special_tokens),
                              recipe.data.near_duplicate_threshold)  # fmt: skip
    encoded_train, text = _encode(tokenizer, train, recipe.data.train_on, alongside=texts)
    encoded_eval, _ = _encode(tokenizer, held_out, recipe.data.train_on)
    max_len = _max_length(recipe, encoded_train)
    train, encoded_train = _act_on_checks(recipe, tokenizer, train, held_out, encoded_train, max_len, stats, text)
    train, encoded_train = _mix(recipe, train, encoded_train, stats)
    lengths = record_lengths(stats, encoded_train, max_len)
    train_rows, kept = _fit(encoded_train, max_len, recipe.data.truncation, stats)
    eval_rows, eval_kept = _fit(encoded_eval, max_len, recipe.data.truncation, DataStats())
    if not len(train_rows):
        raise DataError(_nothing_left(stats, len(train)))
    record_rows(stats, train_rows, eval_rows)
    return PreparedData(
        train_rows.dataset(),
        eval_rows.dataset() if len(eval_rows) else None,
        held_out,
        stats,
        train_where=[train[i].where for i in kept],
        lengths=lengths,
        eval_kept=eval_kept,
    )


def record_lengths(stats: DataStats, encoded: Tokens, max_len: int) -> list[int]:
    """The rows' lengths before fitting (sorted), and their figures in `stats`: percentiles, rows over
    max_seq_length and a suggested max_seq_length."""
    stats.max_seq_length = max_len
    lengths = sorted(encoded.lengths().tolist())
    stats.length_percentiles = {f"p{q}": percentile(lengths, q) for q in (50, 95, 99)} | {
        "max": lengths[-1] if lengths else 0
    }
    stats.over_max_seq_length = sum(n > max_len for n in lengths)
    stats.suggested_max_seq_length = _round_up(stats.length_percentiles["p99"])
    return lengths


def record_rows(stats: DataStats, train_rows: Tokens, eval_rows: Tokens) -> None:
    """The fitted rows' counts and tokens in `stats`."""
    stats.train_rows, stats.eval_rows = len(train_rows), len(eval_rows)
    stats.train_tokens = len(train_rows.ids)
    stats.trained_tokens = int(train_rows.trained().sum())


def _act_on_checks(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train: list[Sample],
                   held_out: list[Sample], encoded: Tokens, max_len: int, stats: DataStats,
                   text: checks.TextChecks | None = None) -> tuple[list, Tokens]:  # fmt: skip
    """Record the data checks' findings (`text`: their text part, when it was run alongside the encoding); drop
    what data.dedup / data.leakage ask, or stop on leakage: error."""
    result = checks.check(train, held_out, encoded, max_len, list(tokenizer.all_special_tokens),
                          recipe.data.near_duplicate_threshold, text)  # fmt: skip
    keep = checks.act(result, list(range(len(train))), recipe.data)
    stats.checks = checks.recorded(result)
    return [train[i] for i in keep], encoded.select(keep)


def _mix(recipe: Recipe, train: list[Sample], encoded: Tokens, stats: DataStats) -> tuple[list, Tokens]:
    """One epoch of the weighted mix (data/mix.py) when the sources have weights; the rows as they are otherwise."""
    from finetune.data import mix

    sources_ = list(recipe.data.train)
    if sources_[0].weight is None:
        return train, encoded
    by_source: list[list[int]] = [[] for _ in sources_]
    for i, sample in enumerate(train):
        by_source[sample.source].append(i)
    empty = [f"data.train[{k}] ({sources_[k].path})" for k, rows in enumerate(by_source) if not rows]
    if empty:
        raise DataError(f"{', '.join(empty)}: no training rows left to mix (held out, dropped or skipped)")
    sizes, weights = [len(rows) for rows in by_source], [float(s.weight or 0) for s in sources_]
    order = mix.mix(sizes, weights, recipe.data.mix_stop, recipe.seed)
    lengths = encoded.lengths().tolist()
    tokens = [[lengths[i] for i in rows] for rows in by_source]
    figures = mix.summary([s.path for s in sources_], sizes, weights, order, tokens)
    stats.mix = {"stop": recipe.data.mix_stop, "sources": [f.to_dict() for f in figures]}
    picked = [by_source[s][r] for s, r in order]
    return [train[i] for i in picked], encoded.select(picked)


def _nothing_left(stats: DataStats, valid: int) -> str:
    """Why no training row is left, naming the files and what took their rows."""
    read = "; ".join(
        f"{s.path}: {s.rows} valid rows, {s.skipped} skipped"
        + (f" ({', '.join(f'{n} {r}' for r, n in s.skipped_by_reason.items())})" if s.skipped else "")
        for s in stats.sources
    )
    if not valid:
        return f"no valid training rows: {read}"
    return (
        f"no training rows left: {read}; of {valid} valid training rows, {stats.dropped} dropped "
        f"(over max_seq_length {stats.max_seq_length} with truncation: drop, or nothing left to train on)"
    )


def _encode(
    tokenizer: PreTrainedTokenizerBase, samples: list[Sample], train_on: str, alongside: Callable[[], T] | None = None
) -> tuple[Tokens, T | None]:
    """Render and tokenize in chunks, in forked processes when there are many rows (templates are Python); and
    `alongside()` (the data checks that read only text) in one of those workers meanwhile, so that both cores work
    from the start. Returns the tokens and what `alongside` returned.

    Forked workers inherit the tokenizer, the samples and `alongside` (`_JOB`) instead of receiving them pickled
    with every chunk (a large vocabulary is megabytes), and send their rows back as flat arrays."""
    global _JOB
    ranges = [(i, min(i + CHUNK, len(samples))) for i in range(0, len(samples), CHUNK)]
    workers = min(os.cpu_count() or 1, 8, len(ranges) + (alongside is not None))
    if len(samples) < PARALLEL_MIN_ROWS or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        tokens = Tokens.concat([_encode_chunk(tokenizer, train_on, samples[a:b]) for a, b in ranges])
        return tokens, alongside() if alongside is not None else None
    _JOB = (tokenizer, train_on, samples, alongside)
    gc.freeze()  # the inherited rows stay out of the workers' garbage collections, which would copy their pages
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            side = pool.apply_async(_run_alongside) if alongside is not None else None  # queued first
            tokens = Tokens.concat(list(pool.imap(_encode_range, ranges)))
            return tokens, side.get() if side is not None else None
    finally:
        gc.unfreeze()
        _JOB = None


T = TypeVar("T")
_JOB: tuple[Any, str, list[Sample], Callable[[], Any] | None] | None = None  # the parent's, for its forked workers


def _encode_chunk(tokenizer: PreTrainedTokenizerBase, train_on: str, samples: list[Sample]) -> Tokens:
    render = Renderer(tokenizer)  # compiled once per chunk
    return tokenize(tokenizer, [sample_segments(render, s, train_on) for s in samples])


def _encode_range(bounds: tuple[int, int]) -> Tokens:
    """In a worker: one chunk of the inherited job."""
    assert _JOB is not None
    tokenizer, train_on, samples, _ = _JOB
    return _encode_chunk(tokenizer, train_on, samples[bounds[0] : bounds[1]])


def _run_alongside() -> Any:
    assert _JOB is not None and _JOB[3] is not None
    return _JOB[3]()


# --- the preprocessing cache ---------------------------------------------------------------


def cache_root() -> Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"


def cache_key(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> str:
    data_sources = list(recipe.data.train) + (list(recipe.data.eval) if isinstance(recipe.data.eval, list) else [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    material = {
        "version": CACHE_VERSION,
        "sources": [sources.fingerprint(s) for s in data_sources],
        "tokenizer": hashlib.sha256((backend.to_str() if backend else repr(tokenizer)).encode()).hexdigest(),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "template": tokenizer.chat_template,
        "data": recipe.data.model_dump(mode="json"),
        "seed": recipe.seed,
        "slice_by": recipe.eval.slice_by,  # the held-out samples carry their slice
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load_cached(key: str) -> PreparedData | None:
    from datasets import load_from_disk

    folder = cache_root() / "data" / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        stats = DataStats(**{**meta["stats"], "sources": [SourceStats(**x) for x in meta["stats"]["sources"]]})
        samples = [Sample(**{**m, "messages": tuple(tuple(t) for t in m["messages"])}) for m in meta["eval_samples"]]
        train = load_from_disk(str(folder / "train"))
        held = load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is rebuilt, never trusted
    return PreparedData(train, held, samples, stats, meta["train_where"], meta["lengths"], meta["eval_kept"])


def _store(key: str, prepared: PreparedData) -> None:
    from finetune.files import atomic_dir, write_json_atomic

    final = cache_root() / "data" / key
    try:
        with atomic_dir(final) as tmp:
            prepared.train.save_to_disk(str(tmp / "train"))
            if prepared.eval is not None:
                prepared.eval.save_to_disk(str(tmp / "eval"))
            meta = {
                "stats": prepared.stats.to_dict(),
                "eval_samples": [asdict(s) for s in prepared.eval_samples],
                "train_where": prepared.train_where,
                "lengths": prepared.lengths,
                "eval_kept": prepared.eval_kept,
            }
            write_json_atomic(tmp / "meta.json", meta)
    except (OSError, WriteError) as e:  # an unwritable cache costs time next run, nothing else
        reason = e.strerror if isinstance(e, OSError) else str(e)
        warnings.warn(f"could not write the data cache {final} ({reason}); going on without it", stacklevel=2)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def _round_up(n: int) -> int:
    return max(64, math.ceil(n / 64) * 64)


def _max_length(recipe: Recipe, encoded: Tokens) -> int:
    """The recipe's max_seq_length, or for `auto` the 95th percentile of lengths rounded up to a multiple of 64."""
    if recipe.data.max_seq_length != "auto":
        return recipe.data.max_seq_length
    return _round_up(percentile(sorted(encoded.lengths().tolist()), 95))


def _fit(rows: Tokens, max_len: int, mode: str, stats: DataStats) -> tuple[Tokens, list[int]]:
    """Truncate or drop rows over max_len, counting both; rows left with nothing to train on are dropped.

    Returns the rows kept and their indices in `rows`.
    """
    import numpy as np

    over = rows.lengths() > max_len
    if mode == "drop":
        stats.dropped += int(over.sum())
    else:
        stats.truncated += int(over.sum())
    keep = ~over if mode == "drop" else np.ones(len(rows), bool)
    untrained = keep & (rows.trained(within=max_len) == 0)
    stats.dropped += int(untrained.sum())
    kept = np.flatnonzero(keep & ~untrained)
    return rows.select(kept, max_len), kept.tolist()
