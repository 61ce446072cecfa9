"""A comparison's summary on synthetic scores with known answers: per slice, with intervals and answer cost,
through the JSON and back, and the gate on slices and interval bounds."""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.scoring import Comparison, ModelScores
from finetune.summary import UNCERTAINTY, EvalSummary, Requirement, gate


def model(scores: list[float], tokens: list[int] | None = None) -> ModelScores:
    n = len(scores)
    tokens = tokens or [4] * n
    return ModelScores(
        loss=0.5, perplexity=1.6, metrics={"exact_match": sum(scores) / n}, outputs=["x"] * n,
        per_example={"exact_match": scores}, tokens=tokens, latency=[0.5] * n,
    )  # fmt: skip


def comparison(tuned: list[float], base: list[float], slices: list[str | None]) -> Comparison:
    n = len(tuned)
    return Comparison(model(tuned, [2] * n), model(base, [8] * n), ["r"] * n, ["p"] * n, slices)


def sliced(easy_wins: int, hard_wins: int, rows: int = 50) -> Comparison:
    """`rows` easy rows then `rows` hard ones; the base gets none right, tuned the first `*_wins` of each."""
    tuned = [float(i < easy_wins) for i in range(rows)] + [float(i < hard_wins) for i in range(rows)]
    return comparison(tuned, [0.0] * 2 * rows, ["easy"] * rows + ["hard"] * rows)


def test_every_figure_overall_and_per_slice_with_row_counts_and_intervals():
    summary = sliced(easy_wins=45, hard_wins=10).summary()
    assert summary.examples == 100 and summary.tuned.metrics["exact_match"] == pytest.approx(0.55)
    assert {name: part.examples for name, part in summary.slices.items()} == {"easy": 50, "hard": 50}
    easy, hard = summary.slices["easy"].rows()[0], summary.slices["hard"].rows()[0]
    assert (easy.tuned, easy.base, easy.record) == (pytest.approx(0.9), 0.0, "45/0/5")
    assert hard.delta == pytest.approx(0.2) and hard.low < 0.2 < hard.high < easy.low
    overall = summary.rows()[-1]
    assert overall.low < 0.55 < overall.high and overall.sign_p < 1e-9
    assert overall.delta_text(2) == f"+0.55 [{overall.low:+.2f}, {overall.high:+.2f}]"


def test_the_summary_json_carries_slices_intervals_and_cost_and_reads_back_the_same():
    summary = sliced(easy_wins=45, hard_wins=10).summary()
    data = summary.to_dict()
    assert set(data["vs_base"]["exact_match"]) == {"delta", "wins", "losses", "ties", "low", "high", "sign_p"}
    assert data["slices"]["hard"]["examples"] == 50 and data["slices"]["hard"]["tuned"]["loss"] is None
    assert data["cost"]["tuned"]["tokens"] == {"mean": 2.0, "p95": 2.0}
    assert data["cost"]["base"]["tokens_per_s"]["mean"] == pytest.approx(16.0)  # 8 tokens in 0.5 s
    assert data["uncertainty"] == UNCERTAINTY
    assert EvalSummary.from_dict(data).to_dict() == data


def test_without_slices_or_a_base_there_is_nothing_to_slice_or_bound():
    summary = Comparison(model([1.0, 0.0]), None, ["r", "r"], ["p", "p"], [None, None]).summary()
    assert summary.slices == {} and summary.intervals == {} and "slices" not in summary.to_dict()
    failures = gate(summary, [Requirement.parse("exact_match.delta.low>0")], False)
    assert failures == ["exact_match.delta.low: needs the base model's scores (eval.compare_base)"]


@pytest.mark.parametrize(
    ("text", "metric", "slice_", "part"),
    [
        ("exact_match>=0.8", "exact_match", None, "value"),
        ("exact_match[hard]>=0.8", "exact_match", "hard", "value"),
        ("exact_match.delta>0", "exact_match", None, "delta"),
        ("exact_match.delta.low>0", "exact_match", None, "low"),
        ("exact_match[long list].delta.high<0.5", "exact_match", "long list", "high"),
        ("my.metrics:score[hard].delta.low>0", "my.metrics:score", "hard", "low"),
        ("loss<=0.5", "loss", None, "value"),
    ],
)
def test_a_requirement_names_a_metric_a_slice_and_a_part(text, metric, slice_, part):
    r = Requirement.parse(text)
    assert (r.metric, r.slice, r.part) == (metric, slice_, part)
    assert text.startswith(r.name + r.op)


def test_one_row_in_ten_does_not_clear_an_interval_gate_forty_in_a_hundred_do():
    gates = [Requirement.parse("exact_match.delta.low>0")]
    one_in_ten = comparison([1.0] + [0.0] * 9, [0.0] * 10, [None] * 10).summary()
    forty_in_100 = comparison([1.0] * 40 + [0.0] * 60, [0.0] * 100, [None] * 100).summary()
    (failure,) = gate(one_in_ten, gates, False)
    assert failure.startswith("exact_match.delta.low = ") and "is under 0" in failure
    assert gate(forty_in_100, gates, False) == []
    assert gate(one_in_ten, [Requirement.parse("exact_match.delta>0")], False) == []  # the point estimate alone passes


def test_a_slice_gate_reads_that_slice_and_an_unknown_slice_is_named():
    summary = sliced(easy_wins=45, hard_wins=10).summary()
    assert gate(summary, [Requirement.parse("exact_match[easy]>=0.8")], False) == []
    (failure,) = gate(summary, [Requirement.parse("exact_match[hard]>=0.8")], False)
    assert failure == "exact_match[hard] = 0.2000 is under 0.8 (required exact_match[hard]>=0.8)"
    assert gate(summary, [Requirement.parse("exact_match[hard].delta.low>0")], False) == []
    with pytest.raises(UserError, match=r"no slice 'medium' in this evaluation \(slices: easy, hard\)"):
        gate(summary, [Requirement.parse("exact_match[medium]>=0.5")], False)


def test_cost_is_summarised_as_mean_and_p95_per_model():
    tuned = model([1.0] * 20, tokens=list(range(1, 21)))
    summary = Comparison(tuned, None, ["r"] * 20, ["p"] * 20, [None] * 20).summary()
    assert summary.cost["tuned"]["tokens"] == {"mean": 10.5, "p95": 19.0}  # nearest rank: the 19th of 20
    assert summary.cost["tuned"]["latency_s"] == {"mean": 0.5, "p95": 0.5}
