"""Weighted mixing of training sources: each row of an epoch comes from source i with probability weight_i,
whatever the sources' sizes (what `datasets.interleave_datasets(probabilities=..., stopping_strategy=...)`
does, done on row indices so the result is cached with the prepared data).

An epoch over a mix: draw a source by its weight (a seeded generator), take that source's next row,
until `first_exhausted` (the first source that has no next row ends the epoch: no row repeats) or
`all_exhausted` (a source that runs out starts again from its first row; the epoch ends once every
source has run out at least once, so the smaller sources' rows repeat). The rows of each source keep
their file order; the trainer shuffles the epoch's rows as it shuffles any dataset. The same seed,
sources and weights give the same rows, so `--resume` continues the same sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from finetune.errors import DataError

if TYPE_CHECKING:
    from finetune.recipe.schema import Recipe

CHUNK = 1 << 16  # source draws made at a time


@dataclass
class SourceMix:
    path: str
    weight: float  # normalised
    rows: int  # distinct rows available (after checks and drops)
    effective_rows: int  # rows in one epoch of the mix
    times_seen: float  # effective_rows / rows: how many times each row is seen per epoch, on average
    tokens: int = 0  # tokens of the effective rows

    def to_dict(self) -> dict:
        return asdict(self)


def mix(sizes: list[int], weights: list[float], stop: str, seed: int) -> list[tuple[int, int]]:
    """(source, row) pairs of one epoch, in the drawn order."""
    p = np.asarray(weights, dtype=float) / sum(weights)
    sizes_ = np.asarray(sizes)
    if (sizes_ == 0).any():
        raise ValueError(f"every source needs a row to mix; sizes {sizes}")
    rng = np.random.default_rng(seed)
    draws: list[np.ndarray] = []
    counts = np.zeros(len(sizes), dtype=np.int64)
    while True:
        chunk = rng.choice(len(sizes), size=CHUNK, p=p)
        taken = np.stack([np.cumsum(chunk == i) for i in range(len(sizes))], axis=1) + counts  # rows taken so far
        if stop == "first_exhausted":  # the first draw of a source with no row left ends the epoch
            over = (taken > sizes_).any(axis=1)
        else:  # the draw after which every source has given all its rows at least once ends it
            over = np.concatenate([[False], (taken >= sizes_).all(axis=1)[:-1]])
        if over.any():
            draws.append(chunk[: int(np.argmax(over))])
            break
        draws.append(chunk)
        counts = taken[-1]
    sources = np.concatenate(draws)
    out, seen = [], [0] * len(sizes)
    for s in sources.tolist():
        out.append((s, seen[s] % sizes[s]))
        seen[s] += 1
    return out


def summary(paths: list[str], sizes: list[int], weights: list[float], order: list[tuple[int, int]],
            tokens: list[list[int]]) -> list[SourceMix]:  # fmt: skip
    """Per source: its weight, distinct rows, rows in an epoch, times each row is seen, tokens drawn."""
    total = sum(weights)
    effective = [0] * len(sizes)
    drawn = [0] * len(sizes)
    for s, r in order:
        effective[s] += 1
        drawn[s] += tokens[s][r]
    return [
        SourceMix(path, w / total, n, e, round(e / max(n, 1), 3), t)
        for path, w, n, e, t in zip(paths, weights, sizes, effective, drawn, strict=True)
    ]


def refuse_weights(recipe: Recipe) -> None:
    """Preference pairs and GRPO prompts are not mixed yet: weights there are refused, not silently ignored."""
    if any(s.weight is not None for s in recipe.data.train):
        raise DataError(f"data.train[].weight: weighted mixing applies to train.method sft, not {recipe.train.method}")
