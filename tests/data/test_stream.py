"""data/stream.py: streaming training sources keep the prepared path's tokens and labels, bad-row rule and mixing
weights, report a bounded sample as a sample, and resume to the exact row sequence. The killed-and-resumed training
run (bit-identical adapter) is scripts/stream_e2e.py: three trainings are too slow for the main suite."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from finetune.data import stream
from finetune.data.stream import Tracked, prepare_stream, raw_stream
from finetune.errors import DataError, RecipeError
from finetune.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
ROWS = [json.loads(line) for line in (ROOT / "assets/quickstart/data/train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    from finetune.modeling import load_tokenizer

    return load_tokenizer(load_recipe(str(QUICKSTART)))


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _streamed(train: str, *sets: str):
    return load_recipe(str(QUICKSTART), [f"data.train={train}", "train.max_steps=5", *sets])


def test_streamed_rows_carry_the_prepared_tokens_and_labels(tmp_path, tokenizer):
    from finetune.data.prepare import prepare_data

    source = _parquet(tmp_path / "train.parquet", ROWS[:120])
    prepared = prepare_data(load_recipe(str(QUICKSTART), [f"data.train=[{{path: {source}}}]"]), tokenizer, False)
    streamed = prepare_stream(_streamed(f"[{{path: {source}, streaming: true}}]"), tokenizer)
    rows = list(islice(iter(streamed.train), 240))  # two passes: the stream starts again after its last row
    assert [r["input_ids"] for r in rows] == list(prepared.train["input_ids"]) * 2
    assert [r["labels"] for r in rows] == list(prepared.train["labels"]) * 2  # the same trained tokens
    assert list(streamed.sample_rows["labels"]) == list(prepared.train["labels"])
    s, p = streamed.stats, prepared.stats
    assert (s.train_rows, s.trained_tokens, s.length_percentiles) == (p.train_rows, p.trained_tokens,
                                                                      p.length_percentiles)  # fmt: skip
    assert s.eval_rows == p.eval_rows == 100  # data.eval's own source, prepared whole


def test_statistics_are_those_of_a_bounded_sample_and_say_so(tmp_path, tokenizer, monkeypatch):
    from finetune.data.inspect import inspect_data
    from finetune.plan import _stream_work

    monkeypatch.setattr(stream, "SAMPLE_ROWS", 50)
    source = _parquet(tmp_path / "train.parquet", ROWS[:400])
    recipe = _streamed(f"[{{path: {source}, streaming: true}}]")
    result = inspect_data(recipe, show=2)
    stats = result.stats
    assert stats.train_rows == 50 and stats.sources[0].rows == 50  # not the 400 rows of the file
    assert stats.sample["rows_read"] == 50 and stats.sample["note"].startswith("statistics of a sample: the first 50")
    assert stats.checks["summary"].endswith("(on a sample: the stream's first 50 valid rows)")
    assert sum(n for _, _, n in result.histogram) == 50 and len(result.examples) == 2
    work = _stream_work(recipe, tokenizer)  # what `finetune plan` counts (plan() itself also builds the model)
    assert work.total_steps == 5 and work.sequences_per_epoch == 5 * 16  # max_steps x batch_size rows
    assert work.note.startswith("streaming: 'per epoch' is the whole run (80 rows)")


def test_weighted_streams_draw_by_weight_and_resume_exactly(tmp_path, tokenizer):
    lines = [json.dumps(r) for r in ROWS[:2000]]
    a, b = _jsonl(tmp_path / "a.jsonl", lines), _jsonl(tmp_path / "b.jsonl", lines)
    recipe = _streamed(f"[{{path: {a}, streaming: true, weight: 0.8}}, {{path: {b}, streaming: true, weight: 0.2}}]")
    share = Counter(r["source"] for r in islice(iter(raw_stream(recipe)), 1000))[0] / 1000
    assert abs(share - 0.8) < 3 * (0.8 * 0.2 / 1000) ** 0.5, share  # within sampling error, whatever the sizes
    small = _streamed(f"[{{path: {_jsonl(tmp_path / 'c.jsonl', lines[:30])}, streaming: true, weight: 0.7}}, "
                      f"{{path: {_jsonl(tmp_path / 'd.jsonl', lines[30:40])}, streaming: true, weight: 0.3}}]")  # fmt: skip
    full = [r["input_ids"] for r in islice(iter(Tracked(prepare_stream(small, tokenizer).train)), 120)]
    for cut in (1, 29, 77):  # inside the first pass of the mix, and passes later
        killed = Tracked(prepare_stream(small, tokenizer).train)
        head = [r["input_ids"] for r in islice(iter(killed), cut + 8)][:cut]  # the loader reads ahead of the steps
        position = json.loads(json.dumps(killed.position(cut)))  # as stream_state.json keeps it
        resumed = Tracked(prepare_stream(small, tokenizer).train, position)
        assert head + [r["input_ids"] for r in islice(iter(resumed), 120 - cut)] == full, cut


def test_a_broken_row_names_its_file_and_line_or_is_skipped_and_counted(tmp_path, tokenizer, monkeypatch):
    lines = [json.dumps(r) for r in ROWS[:6]]
    early = _jsonl(tmp_path / "early.jsonl", [*lines[:2], "{broken", *lines[2:]])
    with pytest.raises(DataError, match=r"early\.jsonl:3: invalid JSON.*data\.on_bad_row: skip"):
        prepare_stream(_streamed(f"[{{path: {early}, streaming: true}}]"), tokenizer)
    skipped = prepare_stream(_streamed(f"[{{path: {early}, streaming: true}}]", "data.on_bad_row=skip"), tokenizer)
    assert skipped.stats.sources[0].skipped_by_reason == {"invalid_json": 1} and skipped.stats.train_rows == 6
    monkeypatch.setattr(stream, "SAMPLE_ROWS", 2)  # a row past the sample goes bad while training reads it
    late = _jsonl(tmp_path / "late.jsonl", [*lines[:4], '{"messages": "not a list"}', *lines[4:]])
    with pytest.raises(DataError, match=r"late\.jsonl:5: "):
        list(islice(iter(prepare_stream(_streamed(f"[{{path: {late}, streaming: true}}]"), tokenizer).train), 6))
    data = prepare_stream(_streamed(f"[{{path: {late}, streaming: true}}]", "data.on_bad_row=skip"), tokenizer)
    assert [r["input_ids"] for r in islice(iter(data.train), 6)] == [r["input_ids"] for r in
                                                                     islice(iter(skipped.train), 6)]  # fmt: skip


RULES = [
    ([], "data.train[0].streaming: needs train.max_steps"),
    (["train.max_steps=5", "data.eval={split_ratio: 0.1}"], "data.eval.split_ratio: cannot be drawn from a stream"),
    (["train.max_steps=5", "data.packing=true"], "data.packing: packs rows prepared up front"),
    (["train.max_steps=5", "data.dedup=exact"], "data.dedup: compares every row with every other"),
    (["train.max_steps=5", "data.train=[{path: a.jsonl, streaming: true}, {path: b.jsonl}]"],
     "data.train[1].streaming: stream every training source or none"),
    (["train.max_steps=5", "data.eval=[{path: a.jsonl, streaming: true}]"],
     "data.eval[0].streaming: held-out sources are read whole"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "message"), RULES, ids=[m.split(":")[0] for _, m in RULES])
def test_what_a_stream_cannot_do_is_a_located_recipe_error(tmp_path, sets, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"extends: {QUICKSTART}\ndata:\n  train:\n    - path: {ROOT}/assets/quickstart/data/train.jsonl\n"
                      "      streaming: true\n")  # fmt: skip
    with pytest.raises(RecipeError) as info:
        load_recipe(str(recipe), sets)
    assert message in str(info.value)
    if not sets:  # the missing key is named at the line that asked for a stream
        assert info.value.problems[0].where == f"{recipe}:5:7"
