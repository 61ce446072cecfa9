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


@contextlib.contextmanager
def reference_prepare() -> Iterator[None]:
    """Within it, finetune.data.prepare encodes, fits and builds datasets the reference way (the rest is shared)."""
    from finetune.data import prepare

    pieces = {"_encode": encode, "_fit": fit, "dataset": dataset}
    saved = {name: getattr(prepare, name) for name in pieces}
    for name, value in pieces.items():
        setattr(prepare, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(prepare, name, value)
