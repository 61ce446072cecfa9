"""Paired bootstrap intervals and the sign test on synthetic scores whose true difference is known."""

from __future__ import annotations

import random

import pytest

from finetune.uncertainty import half_width, paired, rows_needed, sign_test


def scores(n: int, differ: int) -> tuple[list[float], list[float]]:
    """n rows; the first `differ` right for a and wrong for b, the rest scored alike (half right)."""
    a = [1.0] * differ + [float(i % 2) for i in range(n - differ)]
    b = [0.0] * differ + [float(i % 2) for i in range(n - differ)]
    return a, b


def test_known_difference_its_interval_and_record():
    a, b = scores(100, 40)
    interval = paired(a, b)
    assert interval.delta == pytest.approx(0.40)
    assert (interval.n, interval.wins, interval.losses, interval.ties) == (100, 40, 0, 60)
    assert 0.28 < interval.low < 0.40 < interval.high < 0.52
    assert interval.sign_p < 1e-9
    assert interval.text() == f"+0.40 [{interval.low:+.2f}, {interval.high:+.2f}]"


def test_seeded_intervals_repeat_and_the_seed_matters():
    a, b = scores(50, 7)
    assert paired(a, b) == paired(a, b)
    assert paired(a, b, seed=1) != paired(a, b, seed=2)


def test_one_row_in_ten_does_not_clear_zero_forty_in_a_hundred_do():
    """The issue's gate case: +0.1 from one row of 10 is noise (its interval reaches 0); +0.4 on 100 is not."""
    small, large = paired(*scores(10, 1)), paired(*scores(100, 40))
    assert small.delta == pytest.approx(0.1) and small.low <= 0
    assert small.sign_p == 1.0  # one win, no loss: two-sided p = 2 * 0.5
    assert large.low > 0


def test_the_interval_covers_the_true_difference_about_as_often_as_it_says():
    """200 test sets drawn from models whose true accuracies are 0.70 and 0.60: a 95% interval covers the true
    delta of 0.10 in about 95% of them (binomial noise allows 88-99%)."""
    rng, covered = random.Random(7), 0
    for trial in range(200):
        a = [float(rng.random() < 0.70) for _ in range(100)]
        b = [float(rng.random() < 0.60) for _ in range(100)]
        interval = paired(a, b, resamples=500, seed=trial)
        covered += interval.low <= 0.10 <= interval.high
    assert 176 <= covered <= 198, covered


def test_a_token_weighted_delta_is_a_ratio_of_sums_and_equal_weights_change_nothing():
    """The loss's interval: rows of 1 and 9 tokens, the long rows 1.0 better; weighted, the delta is the
    token-weighted mean (0.9), not the row mean (0.5), and every resample is weighted the same way."""
    a, b = [2.0, 1.0] * 20, [2.0, 2.0] * 20
    tokens = [1, 9] * 20
    weighted = paired(b, a, weights=tokens)
    assert weighted.delta == pytest.approx(0.9) and paired(b, a).delta == pytest.approx(0.5)
    assert 0.8 < weighted.low <= 0.9 <= weighted.high <= 1.0 and (weighted.wins, weighted.ties) == (20, 20)
    assert paired(a, b, weights=[3] * 40) == paired(a, b)


def test_sign_test_exact_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)  # P(X <= 1) for X ~ Bin(10, 1/2), both tails
    assert sign_test(1, 9) == sign_test(9, 1)


def test_resolution_and_rows_needed_are_inverse():
    assert half_width(100, 1.0) == pytest.approx(0.196, abs=1e-3)  # every row differs: ±0.20 on 100 rows
    assert half_width(400, 0.25) == pytest.approx(0.049, abs=1e-3)
    assert rows_needed(0.05, 0.25) == 385
    assert half_width(rows_needed(0.05, 0.25), 0.25) <= 0.05


def test_unpaired_scores_are_refused():
    with pytest.raises(ValueError, match="same rows"):
        paired([1.0, 0.0], [1.0])
