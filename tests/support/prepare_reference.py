"""The encoding of finetune/data/prepare.py as it was before it was made faster (2026-12-02), kept as the reference
that the faster one must match token for token and label for label (tests/data/test_prepare_speed.py) and as the
"old" figure of scripts/bench_data.py. Not used by finetune itself.

It renders every prefix through `tokenizer.apply_chat_template` (the last turn's full rendering twice), tokenizes
through `tokenizer(...)` and labels each token by bisecting the piece ends with its start offset.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import multiprocessing
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from finetune.data.formats import Sample
from finetune.data.templates import IGNORE, Segments, render
from finetune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHUNK = 1000
PARALLEL_MIN_ROWS = 4000


def segments(tokenizer: PreTrainedTokenizerBase, sample: Sample, train_on: str) -> Segments:
    if not sample.is_chat:
        bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
        pieces = [(bos + sample.prompt, False), (sample.completion + (tokenizer.eos_token or ""), True)]
        return [(t, train_on == "all" or trained) for t, trained in pieces if t]
    messages = sample.as_messages()
    full = render(tokenizer, messages)
    if train_on == "all":
        return [(full, True)]
    out: Segments = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        start, end = len(prefix), len(upto)
        if not (full.startswith(upto) and upto.startswith(prefix) and pos <= start < end):
            raise UserError(f"{sample.where}: the chat template renders a conversation differently from its prefixes")
        out += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    out.append((full[pos:], False))
    return [(t, trained) for t, trained in out if t]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def tokenize(tokenizer: PreTrainedTokenizerBase, batch: list[Segments]) -> list[tuple[list[int], list[int]]]:
    texts = ["".join(t for t, _ in segs) for segs in batch]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for segs, ids, offsets in zip(batch, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        bounds, flags, pos = [], [], 0
        for text, trained in segs:
            pos += len(text)
            bounds.append(pos)
            flags.append(trained)
        labels = [
            tok if flags[min(bisect.bisect_right(bounds, start), len(flags) - 1)] else IGNORE
            for tok, (start, _) in zip(ids, offsets, strict=True)
        ]
        out.append((list(ids), labels))
    return out


def encode(
    tokenizer: PreTrainedTokenizerBase, samples: list[Sample], train_on: str
) -> list[tuple[list[int], list[int]]]:
    """prepare._encode as it was: chunks of 1000 rows, in forked processes from 4000 rows on."""
    chunks = [samples[i : i + CHUNK] for i in range(0, len(samples), CHUNK)]
    workers = min(os.cpu_count() or 1, 8, len(chunks))
    if len(samples) < PARALLEL_MIN_ROWS or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [row for chunk in chunks for row in _encode_chunk(tokenizer, train_on, chunk)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.imap(functools.partial(_encode_chunk, tokenizer, train_on), chunks)
        return [row for part in parts for row in part]


def _encode_chunk(tokenizer: PreTrainedTokenizerBase, train_on: str, samples: list[Sample]) -> list:
    return tokenize(tokenizer, [segments(tokenizer, s, train_on) for s in samples])


def fit(rows: list[tuple[list[int], list[int]]], max_len: int, mode: str, stats) -> tuple[list, list[int]]:
    """prepare._fit as it was: a generator per token to find rows with nothing trained."""
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


def dataset(rows: list[tuple[list[int], list[int]]]):
    """The Dataset as it was built: `Dataset.from_dict` on Python lists, inferring the types."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})


def prepare(recipe, tokenizer):
    """prepare._prepare as it was: rows as lists of ints from encoding to the Dataset, the data checks after the
    encoding (their text part is shared, their token part as it was), mixing, fitting and figures on the lists."""
    from finetune.data import checks
    from finetune.data import prepare as now

    stats = now.DataStats()
    train, held_out = now.split(recipe, stats)
    eval_keys = {s.key() for s in held_out}
    stats.duplicates_train_eval = sum(s.key() in eval_keys for s in train)
    encoded = encode(tokenizer, train, recipe.data.train_on)
    encoded_eval = encode(tokenizer, held_out, recipe.data.train_on)
    max_len = recipe.data.max_seq_length
    if max_len == "auto":
        max_len = now._round_up(now.percentile(sorted(len(ids) for ids, _ in encoded), 95))
    text = checks.text_checks(train, held_out, list(tokenizer.all_special_tokens), recipe.data.near_duplicate_threshold)
    trained = [_trained(labels) for _, labels in encoded]
    result = checks.assemble(train, text, [*_truncation(train, encoded, max_len), *_outliers(train, encoded)], trained)
    keep = checks.act(result, list(range(len(train))), recipe.data)
    stats.checks = checks.recorded(result)
    train, encoded = [train[i] for i in keep], [encoded[i] for i in keep]
    if recipe.data.train[0].weight is not None:
        picked = _mixed(recipe, train, stats)
        train, encoded = [train[i] for i in picked], [encoded[i] for i in picked]
    lengths = sorted(len(ids) for ids, _ in encoded)
    stats.max_seq_length = max_len
    stats.length_percentiles = {f"p{q}": now.percentile(lengths, q) for q in (50, 95, 99)} | {"max": lengths[-1]}
    stats.over_max_seq_length = sum(n > max_len for n in lengths)
    stats.suggested_max_seq_length = now._round_up(stats.length_percentiles["p99"])
    rows, kept = fit(encoded, max_len, recipe.data.truncation, stats)
    eval_rows, eval_kept = fit(encoded_eval, max_len, recipe.data.truncation, now.DataStats())
    stats.train_rows, stats.eval_rows = len(rows), len(eval_rows)
    stats.train_tokens = sum(len(ids) for ids, _ in rows)
    stats.trained_tokens = sum(_trained(labels) for _, labels in rows)
    return now.PreparedData(
        dataset(rows),
        dataset(eval_rows) if eval_rows else None,
        held_out,
        stats,
        train_where=[train[i].where for i in kept],
        lengths=lengths,
        eval_kept=eval_kept,
    )


def _mixed(recipe, train, stats) -> list[int]:
    """The training rows' indices in one epoch of the weighted mix, and its figures in `stats` (as prepare._mix)."""
    from finetune.data import mix

    sources_ = list(recipe.data.train)
    by_source = [[i for i, s in enumerate(train) if s.source == k] for k in range(len(sources_))]
    sizes, weights = [len(rows) for rows in by_source], [float(s.weight or 0) for s in sources_]
    order = mix.mix(sizes, weights, recipe.data.mix_stop, recipe.seed)
    return [by_source[s][r] for s, r in order]


def _trained(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE)


def _truncation(train, encoded, max_len):
    from finetune.data.checks import _finding

    cut, lost, gone, total = [], 0, [], 0
    for i, (_, labels) in enumerate(encoded):
        total += _trained(labels)
        if len(labels) <= max_len:
            continue
        tail = _trained(labels[max_len:])
        if tail:
            cut.append(i)
            lost += tail
            if not _trained(labels[:max_len]):
                gone.append(i)
    return [
        _finding(
            "truncation",
            cut,
            train,
            f"rows whose trained tokens pass max_seq_length {max_len}; "
            f"{lost:,} trained tokens lost ({lost / max(total, 1):.1%})",
        ),
        _finding("answer_cut_away", gone, train, "rows with no trained token left within max_seq_length"),
    ]


def _outliers(train, encoded):
    from finetune.data.checks import OUTLIER_FACTOR, _finding

    lengths = sorted(len(ids) for ids, _ in encoded)
    if not lengths:
        return []
    median = lengths[len(lengths) // 2]
    rows = [i for i, (ids, _) in enumerate(encoded) if len(ids) > OUTLIER_FACTOR * median]
    return [_finding("length_outliers", rows, train, f"rows over {OUTLIER_FACTOR}x the median of {median} tokens")]


@contextlib.contextmanager
def reference_prepare() -> Iterator[None]:
    """Within it, finetune.data.prepare prepares the reference way (`prepare` above) instead of its own."""
    from finetune.data import prepare as now

    saved, now._prepare = now._prepare, prepare
    try:
        yield
    finally:
        now._prepare = saved
