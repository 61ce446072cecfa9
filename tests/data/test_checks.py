"""data/checks.py: planted problems are each found, with the right rows named."""

from finetune.data.checks import check, to_drop
from finetune.data.formats import Sample
from finetune.data.tokens import Tokens


def _chat(user: str, answer: str, where: str) -> Sample:
    return Sample(where, messages=(("user", user), ("assistant", answer)))


LONG = "the quick brown fox jumps over the lazy dog and runs far away"
TRAIN = [
    _chat("what is two plus two", "four", "t.jsonl:1"),
    _chat("what is two  plus two", "four", "t.jsonl:2"),  # exact duplicate after whitespace
    _chat("what is two plus two", "five", "t.jsonl:3"),  # contradiction
    _chat("say <|im_end|> now", "ok", "t.jsonl:4"),  # template token
    _chat(LONG, "yes it does indeed run far", "t.jsonl:5"),
    _chat(LONG, "yes it does indeed run far!", "t.jsonl:6"),  # near duplicate
    _chat("echo me", "echo me", "t.jsonl:7"),
    _chat("empty", " ", "t.jsonl:8"),  # empty answer, and truncated away below
]
HELD = [_chat("what is two plus two", "four", "e.jsonl:1")]
ENCODED = Tokens.of([([1] * 10, [-100] * 5 + [1] * 5)] * 7 + [([1] * 100, [-100] * 90 + [1] * 10)])


def _found():
    result = check(TRAIN, HELD, ENCODED, 20, ["<|im_end|>"], 0.85)
    return result, {f.kind: f for f in result.findings}


def test_each_planted_problem_is_found_with_its_rows():
    _, found = _found()
    assert found["duplicates"].examples == ["t.jsonl:2 = t.jsonl:1"]
    assert found["near_duplicates"].examples == ["t.jsonl:6 = t.jsonl:5"]
    assert found["leakage"].rows == 1 and found["leakage"].examples[0] == "e.jsonl:1 = t.jsonl:1"
    assert "t.jsonl:1 vs t.jsonl:3" in found["contradictions"].examples
    assert found["truncation"].examples == ["t.jsonl:8"] and "10 trained tokens lost" in found["truncation"].detail
    assert found["answer_cut_away"].examples == ["t.jsonl:8"]
    assert found["empty_answers"].examples == ["t.jsonl:8"]
    assert found["echo_answers"].examples == ["t.jsonl:7"]
    assert found["template_tokens"].examples == ["t.jsonl:4"]


def test_dedup_and_leakage_drop_name_the_training_rows():
    result, _ = _found()
    assert to_drop(result, "exact", "warn") == {1}
    assert to_drop(result, "near", "drop") == {0, 1, 2, 5}
    assert result.dropped == {"duplicates": 2, "leakage": 2}


def test_clean_rows_have_no_findings():
    rows = [_chat(f"question number {i} about topic {i * 7}", f"answer {i}", f"c.jsonl:{i}") for i in range(1, 20)]
    encoded = Tokens.of([([1] * 10, [-100] * 5 + [1] * 5)] * len(rows))
    assert check(rows, [], encoded, 64, [], 0.85).findings == []


def test_shipped_quickstart_data_is_clean():
    """The quickstart's own rows: no finding at all (one reversal task, distinct word lists, short rows)."""
    from finetune.data.prepare import prepare_data
    from finetune.modeling import load_tokenizer
    from finetune.recipe.load import load_recipe

    recipe = load_recipe("recipes/quickstart.yaml", [])
    prepared = prepare_data(recipe, load_tokenizer(recipe), use_cache=False)
    assert prepared.stats.checks["findings"] == [], prepared.stats.checks


def test_prepare_drops_or_stops_as_the_recipe_says(tmp_path):
    """dedup: exact keeps the first copy; leakage: drop removes the leaking training row; leakage: error stops."""
    import json

    import pytest

    from finetune.data.prepare import prepare_data
    from finetune.errors import DataError
    from finetune.modeling import load_tokenizer
    from finetune.recipe.load import load_recipe

    def write(name, pairs):
        rows = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in pairs]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    train = write("t.jsonl", [("one two", "a"), ("one  two", "a"), ("three four", "b"), ("five six", "c")])
    held = write("e.jsonl", [("five six", "c")])
    base = [f"data.train=[{{path: {train}}}]", f"data.eval=[{{path: {held}}}]", "eval.slice_by=null"]
    recipe = load_recipe("recipes/quickstart.yaml", [*base, "data.dedup=exact", "data.leakage=drop"])
    prepared = prepare_data(recipe, load_tokenizer(recipe), use_cache=False)
    assert len(prepared.train) == 2 and [w.rsplit(":", 1)[1] for w in prepared.train_where] == ["1", "3"]
    assert prepared.stats.checks["dropped"] == {"duplicates": 1, "leakage": 1}
    recipe = load_recipe("recipes/quickstart.yaml", [*base, "data.leakage=error"])
    with pytest.raises(DataError, match="leakage"):
        prepare_data(recipe, load_tokenizer(recipe), use_cache=False)


def test_report_html_lists_each_finding_with_its_first_rows():
    from finetune.report import render

    result, _ = _found()
    to_drop(result, "exact", "warn")
    data = {"train_rows": 8, "checks": result.to_dict() | {"summary": result.summary()}}
    page = render({"name": "r", "status": "completed", "data": data}, [], None)
    section = page[page.index("<h2>Data checks</h2>") : page.index("<h2>", page.index("<h2>Data checks</h2>") + 5)]
    for f in result.findings:
        assert f'<td>{f.kind.replace("_", " ")}</td><td class="n">{f.rows:,}</td>' in section
    assert "<td>t.jsonl:2 = t.jsonl:1</td>" in section and "e.jsonl:1 = t.jsonl:1" in section
    assert "Dropped before training: 1 duplicates" in section
    clean = render({"name": "r", "data": {"checks": {"findings": []}}}, [], None)
    assert "<h2>Data checks</h2><p>No findings" in clean
    assert "Data checks" not in render({"name": "r", "data": {}}, [], None)  # a run from before the checks


def _planted_chats(path):
    import json

    rows = [("one two three", "a b"), ("one  two three", "a b"), ("one two three", "c d"), ("four five", "e")] * 3
    rows = rows[:4] + [(f"question {i} here", f"answer {i}") for i in range(20)]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                     {"role": "assistant", "content": a}]}) + "\n" for u, a in rows))  # fmt: skip
    return path


def test_fail_on_exits_1_listing_the_findings_0_when_clean_and_2_for_an_unknown_kind(tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    data = _planted_chats(tmp_path / "t.jsonl")
    args = ["data", "recipes/quickstart.yaml", "--set", f"data.train=[{{path: {data}}}]", "--set", "data.eval=null"]
    runner = CliRunner()
    failed = runner.invoke(app, [*args, "--show", "0", "--fail-on", "duplicates,contradictions"])
    assert failed.exit_code == 1, failed.output
    assert (
        "data check failed: 1 duplicates (later copies; " in failed.output and f"{data}:2 = {data}:1" in failed.output
    )
    assert "data check failed: 2 contradictions" in failed.output and f"{data}:1 vs {data}:3" in failed.output
    assert runner.invoke(app, [*args, "--show", "0", "--fail-on", "leakage"]).exit_code == 0  # no eval set: none
    unknown = runner.invoke(app, [*args, "--show", "0", "--fail-on", "duplicates,typos"])
    assert unknown.exit_code == 2 and "--fail-on: unknown typos" in unknown.output


def test_train_prints_the_summary_of_findings_before_it_trains(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from helpers import write_recipe

    from finetune.recipe.load import load_recipe
    from finetune.train import train

    recipe = write_recipe(tmp_path, tiny_model_dir())
    _planted_chats(tmp_path / "data" / "train.jsonl")
    monkeypatch.chdir(tmp_path)
    result = train(load_recipe(recipe, ["train.max_steps=1", "data.eval=null"]), progress=False)
    line = "data checks: 1 duplicates, 2 contradictions - see `finetune data`"
    assert line in capsys.readouterr().err
    assert result.data["checks"]["summary"] == line
    page = (tmp_path / "runs" / "tiny" / "report.html").read_text()  # the run's report lists them with their rows
    assert '<td>duplicates</td><td class="n">1</td>' in page and "data/train.jsonl:2 = " in page
