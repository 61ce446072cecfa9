"""The held-out summary: each metric's direction, the rows every renderer reads, and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from finetune.summary import EvalSummary, Preference, Row, Scores, lower_is_better


@pytest.mark.parametrize(
    ("metric", "tuned", "base", "better"),
    [
        ("loss", 0.5, 0.9, True),
        ("loss", 0.9, 0.5, False),
        ("perplexity", 1.5, 2.0, True),
        ("exact_match", 0.8, 0.2, True),
        ("exact_match", 0.2, 0.8, False),
        ("my_score", 3.0, 1.0, True),  # a user's metric is higher-is-better
        ("exact_match", 0.5, 0.5, None),
        ("loss", 0.5, None, None),
    ],
)
def test_better_follows_the_metrics_own_direction(metric, tuned, base, better):
    assert Row(metric, tuned, base).better is better


def test_only_the_loss_metrics_are_lower_is_better():
    assert lower_is_better("loss") and lower_is_better("perplexity")
    assert not lower_is_better("exact_match") and not lower_is_better("reward")


def sft_summary() -> EvalSummary:
    tuned = Scores(0.4, 1.49, {"exact_match": 0.75, "contains": 1.0})
    base = Scores(2.0, 7.39, {"exact_match": 0.25, "contains": 0.5})
    records = {"exact_match": {"wins": 2, "losses": 0, "ties": 2}, "contains": {"wins": 2, "losses": 0, "ties": 2}}
    return EvalSummary(tuned, base, 4, records)


def test_rows_list_loss_perplexity_then_the_metrics_in_their_order_with_records():
    rows = sft_summary().rows()
    assert [r.metric for r in rows] == ["loss", "perplexity", "exact_match", "contains"]
    assert rows[0].delta == pytest.approx(-1.6) and rows[0].record == ""
    assert rows[2].record == "2/0/2" and rows[2].better is True


def test_rows_leave_out_figures_a_model_does_not_have():
    summary = EvalSummary(Scores(None, None, {"reward": 0.7}), None, 3)
    [row] = summary.rows()
    assert (row.metric, row.tuned, row.base, row.delta, row.better) == ("reward", 0.7, None, None, None)


def test_the_json_has_the_deltas_against_base_and_reads_back_the_same():
    data = json.loads(json.dumps(sft_summary().to_dict()))  # as written to eval/summary.json
    assert data["vs_base"]["loss"] == {"delta": pytest.approx(-1.6)}
    assert data["vs_base"]["exact_match"] == {"delta": 0.5, "wins": 2, "losses": 0, "ties": 2}
    assert "method" not in data and "harness" not in data
    again = EvalSummary.from_dict(data)
    assert again == sft_summary()
    assert again.to_dict() == data


def test_a_preference_summary_keeps_its_reference_and_records_through_json():
    reference = Scores(None, None, {"preference_accuracy": 0.5}, {"chosen": -9.0, "rejected": -9.5})
    tuned = Scores(None, None, {"preference_accuracy": 0.875}, {"chosen": -7.0, "rejected": -12.0})
    vs_reference = {"preference_accuracy": {"wins": 6, "losses": 1, "ties": 1}}
    summary = EvalSummary(tuned, None, 8, preference=Preference("dpo", 0.1, 8, reference, False, vs_reference))
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["method"] == "dpo" and data["pairs"] == 8 and data["reference"]["logps"] == reference.logps
    assert data["vs_reference"]["preference_accuracy"] == {"delta": 0.375, "wins": 6, "losses": 1, "ties": 1}
    assert EvalSummary.from_dict(data) == summary


def test_nothing_recorded_reads_back_as_no_summary():
    assert EvalSummary.from_dict(None) is None
    assert EvalSummary.from_dict({}) is None
    assert EvalSummary.from_dict({"tuned": None, "base": None}) is None
