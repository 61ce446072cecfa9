"""Blind review sheets on a hand-made evaluation: the round trip with known preferences per slice, the Wilson
interval against known values, and broken sheets named by row and column (the CLI round trip on a trained
run is in tests/test_judge.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.review_sheet import Tally, read_ratings, write_sheet
from finetune.uncertainty import wilson


@pytest.mark.parametrize(
    ("wins", "n", "low", "high"),
    [(7, 10, 0.3968, 0.8922), (3, 3, 0.4385, 1.0), (0, 5, 0.0, 0.4345), (50, 100, 0.4038, 0.5962)],
)
def test_wilson_interval_matches_known_values(wins, n, low, high):
    assert wilson(wins, n) == pytest.approx((low, high), abs=1e-4)
    assert wilson(0, 0) is None


def test_ties_are_counted_apart_from_the_win_rate():
    tally = Tally()
    for outcome in ["tuned"] * 6 + ["base"] * 2 + ["tie"] * 3 + [""]:
        tally.add(outcome)
    t = tally.to_dict()
    assert (t["wins"], t["losses"], t["ties"], t["unrated"], t["win_rate"]) == (6, 2, 3, 1, 0.75)


def evaluation(eval_dir: Path, n: int = 12) -> None:
    """An eval/examples.jsonl whose tuned answers say `good` and base answers `bad`; rows sliced short/long."""
    rows = [{"prompt": f"question {i}", "reference": "r", "tuned": f"good {i}", "base": f"bad {i}",
             "slice": "short" if i < 8 else "long"} for i in range(n)]  # fmt: skip
    eval_dir.mkdir(parents=True)
    (eval_dir / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fill(sheet: Path, choose) -> list[dict]:
    """The rater: `choose(item, good_position)` gives the `preferred` cell; the answers say which is good."""
    with sheet.open(newline="") as f:
        items = list(csv.DictReader(f))
    for item in items:
        good = "1" if item["answer_1"].startswith("good") else "2"
        item["preferred"] = choose(item, good)
    write(sheet, items)
    return items


def write(sheet: Path, items: list[dict]) -> None:
    with sheet.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(items[0]))
        writer.writeheader()
        writer.writerows(items)


def test_round_trip_gives_the_raters_preference_overall_and_per_slice(tmp_path):
    eval_dir = tmp_path / "run" / "eval"
    evaluation(eval_dir)
    written = write_sheet(eval_dir, tmp_path / "sheet.csv", seed=3)
    assert written.items == 12 and written.slices == {"short": 8, "long": 4}
    html = (tmp_path / "sheet.html").read_text()
    assert "good 5" in html and "bad 5" in html and "tuned" not in html and "base" not in html
    positions = []

    def choose(item, good):
        positions.append(good)
        question = int(item["prompt"].split()[1])
        if question in (0, 9):  # one loss in each slice
            return "2" if good == "1" else "1"
        return "tie" if question == 1 else "" if question == 2 else good  # a tie and a blank in `short`

    fill(tmp_path / "sheet.csv", choose)
    assert {"1", "2"} == set(positions)  # the tuned answer is not always in the same place
    result = read_ratings(eval_dir, tmp_path / "sheet.csv")
    assert (result.overall["wins"], result.overall["losses"], result.overall["ties"], result.overall["unrated"]) == (
        8,
        2,
        1,
        1,
    )
    assert result.overall["win_rate"] == 0.8 and result.overall["interval"] == pytest.approx(wilson(8, 10))
    assert result.slices["short"]["wins"] == 5 and result.slices["short"]["losses"] == 1
    assert result.slices["long"]["wins"] == 3 and result.slices["long"]["losses"] == 1
    assert json.loads(Path(result.record).read_text())["overall"] == result.overall
    assert Path(result.record).parent == eval_dir / "review"


def test_a_broken_sheet_is_named_by_row_and_column(tmp_path):
    eval_dir = tmp_path / "run" / "eval"
    evaluation(eval_dir, n=4)
    write_sheet(eval_dir, tmp_path / "sheet.csv", seed=0)
    items = fill(tmp_path / "sheet.csv", lambda item, good: good)
    items[1]["preferred"] = "both"
    items[2]["item"] = "seven"
    items[3]["item"] = items[0]["item"]
    write(tmp_path / "sheet.csv", items)
    with pytest.raises(UserError) as raised:
        read_ratings(eval_dir, tmp_path / "sheet.csv")
    found = [str(p) for p in raised.value.problems]
    assert len(found) == 3
    assert found[0].startswith(f"{tmp_path / 'sheet.csv'}, row 3 column preferred: 'both'")
    assert found[1].startswith(f"{tmp_path / 'sheet.csv'}, row 4 column item: 'seven'")
    assert "row 5 column item" in found[2] and "first on row 2" in found[2]

    other = [dict(i, sheet="0123456789ab") for i in items[:1]]
    write(tmp_path / "other.csv", other)
    with pytest.raises(UserError, match=r"row 2 column sheet: no sheet '0123456789ab'"):
        read_ratings(eval_dir, tmp_path / "other.csv")
    (tmp_path / "headless.csv").write_text("item,preferred\n1,1\n")
    with pytest.raises(UserError, match=r"headless.csv, row 1: missing column\(s\) sheet"):
        read_ratings(eval_dir, tmp_path / "headless.csv")


def test_a_sheet_needs_an_evaluation_with_base_answers(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "examples.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r", "tuned": "t"}) + "\n")
    with pytest.raises(UserError, match="--against base"):
        write_sheet(eval_dir, tmp_path / "sheet.csv", seed=0)
