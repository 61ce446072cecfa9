"""How sure a difference is: a paired bootstrap interval on the mean per-example difference, and a sign test.

Every comparison of two models on the same held-out rows (tuned against base, one run against another) is
paired: both answered the same prompts, so the difference is taken row by row and only the rows are
resampled, which is what makes +0.02 on 100 rows read differently from +0.60. The resampling is seeded, so
an interval is reproducible: the same scores give the same bounds on every machine.

    paired(tuned_scores, base_scores) -> Interval(delta, low, high, n, wins, losses, ties, sign_p)
    paired(tuned_losses, base_losses, weights=tokens)   # a token-weighted mean, as the held-out loss is

With `weights` (a row's trained tokens) the delta is the weighted mean difference, sum(w*(a-b)) / sum(w), and
each resample recomputes that ratio over the rows it drew: rows stay the unit that is resampled, so a long row
counts as much as its tokens, exactly as in the overall loss, and no more.

`half_width(n, discordant)` is the resolution a test set of n rows gives (docs/guides/evaluation.md has its
table): the normal approximation of the same interval, for planning how many rows to hold out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """`delta` = mean(a) - mean(b) over paired rows, its bootstrap interval [low, high], and the per-row record."""

    delta: float
    low: float
    high: float
    n: int
    wins: int  # rows where a scored higher than b
    losses: int
    ties: int
    sign_p: float  # two-sided exact sign test on wins against losses (ties left out): 1.0 when none differ

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """`+0.12 [+0.05, +0.19]`, as every table shows a difference."""
        return f"{self.delta:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    weights: Sequence[float] | None = None,
) -> Interval:
    """The difference of a over b on the same rows, with a percentile bootstrap interval of its (weighted) mean."""
    if len(a) != len(b) or (weights is not None and len(weights) != len(a)):
        raise ValueError(f"paired scores need the same rows: {len(a)} against {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    low, high = bootstrap(diffs, confidence, resamples, seed, weights)
    if weights is None:
        delta = sum(diffs) / len(diffs) if diffs else 0.0
    else:
        total = sum(weights)
        delta = sum(w * d for w, d in zip(weights, diffs, strict=True)) / total if total else 0.0
    return Interval(delta, low, high, len(diffs), wins, losses, len(diffs) - wins - losses, sign_test(wins, losses))


def bootstrap(diffs: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
              seed: int = SEED, weights: Sequence[float] | None = None) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of the mean of `diffs` (weighted by `weights`: a ratio of sums per resample), rows
    drawn with replacement `resamples` times (seeded)."""
    import numpy as np

    if not diffs:
        return 0.0, 0.0
    values = np.asarray(diffs, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # 500 resamples at a time bound the memory for large test sets
        stop = min(start + 500, resamples)
        drawn = rng.integers(0, len(values), (stop - start, len(values)))
        if w is None:
            means[start:stop] = values[drawn].mean(axis=1)
        else:
            means[start:stop] = (values[drawn] * w[drawn]).sum(axis=1) / np.maximum(w[drawn].sum(axis=1), 1e-300)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` under "either is as likely" (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion successes/n (preferences, win rates: stays inside [0, 1] at
    the 20-200 items of a human review, where the normal approximation does not); None for n = 0."""
    if n == 0:
        return None
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def half_width(n: int, discordant: float, confidence: float = CONFIDENCE) -> float:
    """The interval's half-width for a 0/1 metric on n paired rows of which a share `discordant` differ
    (at a delta of 0, the widest): z * sqrt(discordant / n)."""
    z = _z(confidence)
    return z * math.sqrt(discordant / n)


def rows_needed(resolution: float, discordant: float, confidence: float = CONFIDENCE) -> int:
    """The held-out rows for an interval no wider than ±`resolution` (the inverse of `half_width`)."""
    return math.ceil(discordant * (_z(confidence) / resolution) ** 2)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)
