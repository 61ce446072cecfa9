"""Data: formats and row validation, loss masks per template, truncation, the eval split."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import tiny

from finetune.data.formats import BadRow, to_sample
from finetune.data.prepare import prepare_data, split
from finetune.data.templates import IGNORE, apply_chat_template, segments, tokenize
from finetune.errors import DataError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import BUILTIN_TEMPLATES, DataSource

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: red blue"},
    {"role": "assistant", "content": "blue red"},
    {"role": "user", "content": "Reverse: lime plum"},
    {"role": "assistant", "content": "plum lime"},
]
# What each template must train for an assistant turn: its content and its end-of-turn marker, nothing else.
TRAINED_TURN = {
    "auto": "{}<|im_end|>\n",
    "chatml": "{}<|im_end|>\n",
    "qwen2.5": "{}<|im_end|>\n",
    "llama3": "{}<|eot_id|>",
    "mistral": " {}</s>",
    "gemma": "{}<end_of_turn>\n",
    "phi3": "{}<|end|>\n",
}


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def source(fmt: str = "messages", **kw) -> DataSource:
    return DataSource(path="/x.jsonl", format=fmt, **kw)


def trained_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, current = [], []
    for tok, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("template", ["auto", *BUILTIN_TEMPLATES])
def test_assistant_mask_is_exactly_the_assistant_turns_and_their_end_token(tokenizer, template):
    apply_chat_template(tokenizer, template)
    sample = to_sample({"messages": CONVERSATION}, "t.jsonl:1", source())
    [(ids, labels)] = tokenize(tokenizer, [segments(tokenizer, sample, "assistant")])
    expected = [TRAINED_TURN[template].format(m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_runs(tokenizer, ids, labels) == expected
    end_of_turn = {"llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn.get(template, "<|im_end|>"))
    trained_ids = [tok for tok, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert trained_ids.count(end_id) == 2, "each assistant turn's end-of-turn token, as one id, is trained"


def test_train_on_all_trains_every_token(tokenizer):
    apply_chat_template(tokenizer, "chatml")
    sample = to_sample({"messages": CONVERSATION}, "t.jsonl:1", source())
    [(ids, labels)] = tokenize(tokenizer, [segments(tokenizer, sample, "all")])
    assert labels == ids


def test_completion_format_trains_the_completion_and_eos(tokenizer):
    sample = to_sample({"prompt": "2+2=", "completion": "4"}, "t.jsonl:1", source("completion"))
    [(ids, labels)] = tokenize(tokenizer, [segments(tokenizer, sample, "assistant")])
    assert trained_runs(tokenizer, ids, labels) == ["4<|im_end|>"]
    text = to_sample({"text": "hello"}, "t.jsonl:1", source("completion"))
    [(ids, labels)] = tokenize(tokenizer, [segments(tokenizer, text, "assistant")])
    assert labels == ids


def test_alpaca_and_preference_become_chats():
    alpaca = to_sample({"instruction": "Do", "input": "this", "output": "done"}, "w", source("alpaca"))
    assert alpaca.messages == (("user", "Do\n\nthis"), ("assistant", "done"))
    pref = to_sample({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "w", source("preference"))
    assert pref.messages == (("user", "Q"), ("assistant", "good"))


def test_column_mapping_renames_fields():
    row = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    sample = to_sample(row, "w", source(columns={"messages": "conversations"}))
    assert sample.messages[-1] == ("assistant", "yo")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({}, "missing field 'messages'"),
        ({"messages": [{"role": "user", "content": "a"}]}, "last turn must be the assistant's"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "is empty"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "'assistant' where 'user' was expected"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}, "must be text"),
    ],
)
def test_bad_rows_say_what_is_wrong(row, message):
    with pytest.raises(BadRow, match=message):
        to_sample(row, "w", source())


def write_recipe(tmp_path: Path, model_dir: Path, rows: list, extra: str = "") -> Path:
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    body = f"""\
        name: t
        model: {{base: {model_dir}}}
        data:
          train: [{{path: data/train.jsonl}}]
    """
    recipe.write_text(textwrap.dedent(body) + extra)
    return recipe


def test_a_bad_row_names_its_file_and_line(tmp_path, tiny_model_dir, tokenizer):
    rows = [*tiny.reverse_rows(3), {"messages": [{"role": "user", "content": "x"}]}]
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(), rows))
    with pytest.raises(DataError, match=r"data/train\.jsonl:4: the last turn must be the assistant's"):
        prepare_data(recipe, tokenizer)


def test_invalid_json_names_its_line(tmp_path, tiny_model_dir, tokenizer):
    rows = [*tiny.reverse_rows(2), "{not json"]
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(), rows))
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        prepare_data(recipe, tokenizer)


def test_skipped_rows_are_counted(tmp_path, tiny_model_dir, tokenizer):
    rows = [*tiny.reverse_rows(5), {"messages": []}, {"nope": 1}]
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(), rows, "  on_bad_row: skip\n"))
    prepared = prepare_data(recipe, tokenizer)
    assert (prepared.stats.sources[0].rows, prepared.stats.sources[0].skipped) == (5, 2)
    assert prepared.stats.train_rows == 5


def test_long_rows_are_truncated_or_dropped_and_counted(tmp_path, tiny_model_dir, tokenizer):
    long = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "alpha " * 80}]}
    rows = [*tiny.reverse_rows(4), long]
    for mode, kept, truncated, dropped in (("truncate", 5, 1, 0), ("drop", 4, 0, 1)):
        extra = f"  max_seq_length: 32\n  truncation: {mode}\n"
        recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(), rows, extra))
        prepared = prepare_data(recipe, tokenizer)
        assert (prepared.stats.train_rows, prepared.stats.truncated, prepared.stats.dropped) == (
            kept,
            truncated,
            dropped,
        )
        assert max(len(ids) for ids in prepared.train["input_ids"]) <= 32


def test_auto_max_seq_length_is_the_p95_rounded_up(tmp_path, tiny_model_dir, tokenizer):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(), tiny.reverse_rows(20), "  max_seq_length: auto\n"))
    assert prepare_data(recipe, tokenizer).stats.max_seq_length == 64


def test_split_is_deterministic_by_seed_and_disjoint(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir(), tiny.reverse_rows(50), "  eval: {split_ratio: 0.2}\n")
    from finetune.data.prepare import DataStats

    first = split(load_recipe(path), DataStats())
    again = split(load_recipe(path), DataStats())
    other = split(load_recipe(path, ["seed=7"]), DataStats())
    assert [s.where for s in first[1]] == [s.where for s in again[1]]
    assert [s.where for s in first[1]] != [s.where for s in other[1]]
    assert len(first[1]) == 10 and len(first[0]) == 40
    assert not {s.where for s in first[0]} & {s.where for s in first[1]}


def test_csv_and_parquet_sources_name_their_rows(tmp_path, tiny_model_dir, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("prompt,completion\n1+1=,2\n2+2=,\n")
    pq.write_table(pa.table({"prompt": ["3+3="], "completion": ["6"]}), tmp_path / "data" / "b.parquet")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        textwrap.dedent(f"""\
        name: t
        model: {{base: {tiny_model_dir()}}}
        data:
          train:
            - {{path: data/a.csv, format: completion}}
            - {{path: data/b.parquet, format: completion}}
        """)
    )
    with pytest.raises(DataError, match=r"a\.csv:3: field 'completion' is empty"):
        prepare_data(load_recipe(recipe_path), tokenizer)
    prepared = prepare_data(load_recipe(recipe_path, ["data.on_bad_row=skip"]), tokenizer)
    assert prepared.stats.train_rows == 2


def test_finetune_data_shows_stats_and_trained_text_without_weights(tmp_path, tiny_tokenizer_dir):
    import shutil
    import subprocess
    import sys

    no_weights = tmp_path / "tokenizer_only"
    shutil.copytree(tiny_tokenizer_dir, no_weights)  # no config.json, no safetensors: nothing to load
    rows = [
        *tiny.reverse_rows(9),
        {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "x " * 60}]},
    ]
    recipe = write_recipe(tmp_path, no_weights, rows, "  max_seq_length: 32\n  eval: {split_ratio: 0.2}\n")

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "finetune.cli", "data", str(recipe), *a], capture_output=True, text=True
        )

    result = run("--json", "--show", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    stats = report["stats"]
    assert (stats["train_rows"], stats["eval_rows"], stats["sources"][0]["rows"]) == (8, 2, 10)
    p99 = stats["length_percentiles"]["p99"]
    assert stats["length_percentiles"]["max"] > 32 and stats["suggested_max_seq_length"] == -(-p99 // 64) * 64
    assert sum(b["rows"] for b in report["histogram"]) == 8
    example = report["examples"][0]
    trained = "".join(p["text"] for p in example["pieces"] if p["trained"])
    masked = "".join(p["text"] for p in example["pieces"] if not p["trained"])
    assert trained.endswith("<|im_end|>\n") and "Reverse:" in masked and "Reverse:" not in trained
    assert example["trained_tokens"] < example["tokens"]
    plain = run("--no-color", "--show", "1").stdout
    assert "[[" in plain and "]]" in plain and "\x1b[" not in plain


def test_preprocessing_is_cached_and_never_stale(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    import finetune.data.prepare as prepare_module

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    sliced = [{**row, "level": str(i % 2)} for i, row in enumerate(tiny.reverse_rows(10))]
    path = write_recipe(tmp_path, tiny_model_dir(), sliced, "  eval: {split_ratio: 0.2}\neval: {slice_by: level}\n")
    first = prepare_data(load_recipe(path), tokenizer)
    calls = []
    real = prepare_module._prepare
    monkeypatch.setattr(prepare_module, "_prepare", lambda *a: calls.append(1) or real(*a))
    again = prepare_data(load_recipe(path), tokenizer)
    assert calls == [] and again.train["input_ids"] == first.train["input_ids"]
    assert [s.messages for s in again.eval_samples] == [s.messages for s in first.eval_samples]
    assert again.stats == first.stats
    assert again.eval_samples == first.eval_samples and {s.slice for s in again.eval_samples} <= {"0", "1"}
    assert again.eval_kept == first.eval_kept == [0, 1]  # each loss row's sample, for its slice

    rows = sliced
    rows[0]["messages"][1]["content"] = "changed answer"
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = prepare_data(load_recipe(path), tokenizer)
    assert calls == [1] and edited.train["input_ids"] != first.train["input_ids"]
    prepare_data(load_recipe(path, ["data.chat_template=phi3"]), tokenizer)
    assert calls == [1, 1]


def test_many_rows_are_encoded_in_several_processes_with_the_same_result(tokenizer, monkeypatch):
    import finetune.data.prepare as prepare_module

    samples = [to_sample(r, f"t:{i}", source()) for i, r in enumerate(tiny.reverse_rows(300))]
    serial = prepare_module._encode(tokenizer, samples, "assistant")
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(prepare_module, "CHUNK", 50)
    assert prepare_module._encode(tokenizer, samples, "assistant") == serial


def test_hub_dataset_is_read_from_a_prepopulated_hub_cache(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """The real hub path (snapshot_download + datasets), offline: the dataset repo is in the hub cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--reverse"
    tiny.write_jsonl(repo / "snapshots" / commit / "data" / "train.jsonl", tiny.reverse_rows(6))
    tiny.write_jsonl(repo / "snapshots" / commit / "data" / "test.jsonl", tiny.reverse_rows(2, seed=3))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = write_recipe(tmp_path, tiny_model_dir(), [])
    path.write_text(path.read_text().replace("{path: data/train.jsonl}", "{path: acme/reverse, split: test}"))
    prepared = prepare_data(load_recipe(path), tokenizer)
    assert prepared.stats.train_rows == 2 and prepared.train_where[0] == "acme/reverse[test]:row 1"
    missing = load_recipe(path, ["data.train.0.path=acme/absent"])
    with pytest.raises(DataError, match="acme/absent: hub dataset not in the local cache"):
        prepare_data(missing, tokenizer)


# --- bad input found by generated tests (issue 28) ------------------------------------------------


def read_row(row: dict, fmt: str):
    """A row as training reads it: a sample for SFT, judged completions for the preference formats."""
    from finetune.data.formats import to_judged

    if fmt == "unpaired":
        return to_judged(row, "w", source(fmt))
    return to_sample(row, "w", source(fmt)), (to_judged(row, "w", source(fmt)) if fmt == "preference" else None)


def test_format_rows_cover_every_format():
    from mutations import FORMAT_ROWS

    from finetune.recipe.schema import FORMAT_FIELDS

    assert set(FORMAT_ROWS) == set(FORMAT_FIELDS)
    for fmt, rows in FORMAT_ROWS.items():
        for row in rows:
            read_row(row, fmt)  # each is valid


def test_a_lone_surrogate_in_any_text_field_of_any_format_is_a_bad_row():
    """`"\\ud800"` is valid JSON but not text: refused as not_utf8 (skippable), never a tokenizer TypeError."""
    from mutations import FORMAT_ROWS, get, text_leaves, with_value

    from finetune.data.formats import to_judged

    tried = 0
    for fmt, rows in FORMAT_ROWS.items():
        for row in rows:
            for path in text_leaves(row):
                if path[-1] == "role":
                    continue  # a bad role is refused as an unknown role
                original, bad = get(row, path), row
                for same in [p for p in text_leaves(row) if get(row, p) == original]:  # shared prompt turns too
                    bad = with_value(bad, same, "x\ud800y")
                readers = (
                    [to_judged] if fmt == "unpaired" else [to_sample, to_judged] if fmt == "preference" else [to_sample]
                )
                for reader in readers:
                    with pytest.raises(BadRow, match="lone surrogate") as info:
                        reader(bad, "w", source(fmt))
                    assert info.value.reason == "not_utf8"
                    tried += 1
    assert tried >= 20


def test_a_conversation_pair_trains_on_the_chosen_conversation_under_sft():
    """Both shapes of `preference` give SFT the chosen conversation, as the formats table says."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b"}]
    row = {"chosen": [*turns, {"role": "assistant", "content": "b a"}],
           "rejected": [*turns, {"role": "assistant", "content": "a b"}]}  # fmt: skip
    sample = to_sample(row, "w", source("preference"))
    assert sample.messages == (("system", "Be brief."), ("user", "Reverse: a b"), ("assistant", "b a"))
    text = to_sample({"prompt": "Reverse: a b", "chosen": "b a", "rejected": "a b"}, "w", source("preference"))
    assert text.messages == (("user", "Reverse: a b"), ("assistant", "b a"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_kto_labels_read_from_every_file_type(tmp_path, suffix):
    """A CSV label is the text 'true'/'false'; JSON and Parquet hold booleans: all read as the same labels."""
    from mutations import write_rows

    from finetune.data.preference import PreferenceStats, load_judged

    rows = [{"prompt": f"Reverse: a{i} b", "completion": f"b a{i}", "label": i % 2 == 0} for i in range(4)]
    path = write_rows(tmp_path / f"kto{suffix}", rows)
    groups = load_judged([DataSource(path=str(path), format="unpaired")], "error", PreferenceStats())
    assert [g[0].desirable for g in groups] == [True, False, True, False]


def test_kto_with_every_row_skipped_says_why_not_max_of_an_empty_sequence(tmp_path, tokenizer):
    from finetune.data.preference import prepare_preference

    (tmp_path / "model").mkdir()
    rows = [{"prompt": "p", "completion": "c", "label": "maybe"}] * 3
    tiny.write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "name: k\nmodel: {base: ./model}\ntrain: {method: kto}\n"
        "data: {train: [{path: kto.jsonl, format: unpaired}], on_bad_row: skip, eval: {split_ratio: 0.2}}\n"
    )
    recipe = load_recipe(recipe_path, check_files=False)
    with pytest.raises(
        DataError, match=r"no valid training rows: .*kto.jsonl: 0 valid rows, 3 skipped \(3 wrong_type\)"
    ):
        prepare_preference(recipe, tokenizer)


def test_held_out_rows_carry_their_slice_from_a_column_or_their_source(tmp_path, tiny_model_dir):
    from finetune.data.prepare import DataStats

    rows = [{**row, "level": "hard" if i % 3 == 0 else "easy"} for i, row in enumerate(tiny.reverse_rows(30))]
    path = write_recipe(tmp_path, tiny_model_dir(), rows, "  eval: {split_ratio: 0.3}\neval:\n  slice_by: level\n")
    _, held_out = split(load_recipe(path), DataStats())
    line = {s.where: int(s.where.rpartition(":")[2]) - 1 for s in held_out}
    assert [s.slice for s in held_out] == ["hard" if line[s.where] % 3 == 0 else "easy" for s in held_out]
    (tmp_path / "data" / "extra.jsonl").write_text(json.dumps(tiny.reverse_rows(1)[0]) + "\n")
    named = write_recipe(tmp_path, tiny_model_dir(), rows, "  eval: [{path: data/extra.jsonl, slice: unseen}]\n"
                         "eval:\n  slice_by: level\n")  # fmt: skip
    assert [s.slice for s in split(load_recipe(named), DataStats())[1]] == ["unseen"]  # the source's wins


def test_a_held_out_row_without_the_slice_column_is_named(tmp_path, tiny_model_dir):
    from finetune.data.prepare import DataStats

    rows = [{**row, "level": "easy"} for row in tiny.reverse_rows(10)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text(
        json.dumps(rows[0]) + "\n" + json.dumps(tiny.reverse_rows(2)[1]) + "\n"
    )
    path = write_recipe(
        tmp_path, tiny_model_dir(), rows, "  eval: [{path: data/eval.jsonl}]\neval:\n  slice_by: levle\n"
    )
    with pytest.raises(DataError) as info:
        split(load_recipe(path), DataStats())
    assert [p.where.rpartition("/")[2] for p in info.value.problems] == ["eval.jsonl:1", "eval.jsonl:2"]
    assert "eval.slice_by: no column 'levle' in this held-out row (2 of 2 rows lack it)" in str(info.value)


# --- the faster encoding gives the tokens and labels of the reference one (tests/support/prepare_reference.py) ----

GENERATION_MASK_TEMPLATE = (  # ChatML with transformers' {% generation %} marks around what the assistant says
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EDGE_ROWS = [  # multi-turn, with and without a system prompt, unicode, whitespace runs, long rows to truncate
    {"messages": CONVERSATION},
    {"messages": CONVERSATION[1:3]},
    {"messages": [{"role": "system", "content": "Réponds  brièvement.\t"}, *CONVERSATION[1:] * 3]},
    {
        "messages": [
            {"role": "user", "content": "naïve café 日本語 😀👍🏽 e\u0301 \u00a0x"},
            {"role": "assistant", "content": "  😀 日本 \n\n tab\there  "},
        ]
    },
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ok " * 120}]},
    {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "short"}]},
    {"messages": [{"role": "user", "content": "\n"}, {"role": "assistant", "content": "ünïcödé\n"}]},
]
RAW_ROWS = [{"prompt": "2+2=", "completion": " 4 ✓"}, {"prompt": "", "completion": "héllo wörld"}, {"text": "só text"}]


def edge_samples() -> list:
    chats = [to_sample(r, f"t.jsonl:{i + 1}", source()) for i, r in enumerate(EDGE_ROWS * 3)]
    return chats + [to_sample(r, f"c.jsonl:{i + 1}", source("completion")) for i, r in enumerate(RAW_ROWS)]


@pytest.mark.parametrize("template", ["auto", "llama3", "mistral", "gemma", "generation_mask"])
@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_the_encoding_gives_the_reference_tokens_and_labels(tokenizer, tmp_path, template, train_on, monkeypatch):
    """Every template family (ChatML's markers as single tokens, others' split), a template with generation marks,
    both train_on values, unicode and whitespace: ids and labels equal the reference's, serial and in processes."""
    import prepare_reference

    import finetune.data.prepare as prepare_module

    if template == "generation_mask":
        (tmp_path / "gen.jinja").write_text(GENERATION_MASK_TEMPLATE)
        template = str(tmp_path / "gen.jinja")
    apply_chat_template(tokenizer, template)
    samples = edge_samples()
    expected = prepare_reference.encode(tokenizer, samples, train_on)
    assert list(prepare_module._encode(tokenizer, samples, train_on)[0]) == expected
    assert any(IGNORE in labels for _, labels in expected) == (train_on == "assistant")
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_ROWS", 4)
    monkeypatch.setattr(prepare_module, "CHUNK", 5)
    tokens, beside = prepare_module._encode(tokenizer, samples, train_on, alongside=lambda: len(samples))
    assert list(tokens) == expected and beside == len(samples), "in forked workers, with a job run alongside"


@pytest.mark.parametrize(("truncation", "dedup"), [("truncate", "none"), ("drop", "none"), ("truncate", "exact")])
def test_prepared_data_is_the_reference_preparation_row_for_row(tmp_path, tiny_model_dir, tokenizer, truncation,
                                                                dedup):  # fmt: skip
    """The whole preparation (split, the checks and what they drop, truncation, the datasets' columns and types,
    the figures) is unchanged."""
    from prepare_reference import reference_prepare

    rows = [r for r in EDGE_ROWS for _ in range(2)] + tiny.reverse_rows(20)
    sets = ["data.max_seq_length=48", f"data.truncation={truncation}", "data.eval={split_ratio: 0.2}",
            f"data.dedup={dedup}"]  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir(), rows), sets)
    now = prepare_data(recipe, tokenizer, use_cache=False)
    with reference_prepare():
        before = prepare_data(recipe, tokenizer, use_cache=False)
    assert now.train.features == before.train.features and now.eval.features == before.eval.features
    assert now.train.to_dict() == before.train.to_dict() and now.eval.to_dict() == before.eval.to_dict()
    assert now.stats == before.stats and now.train_where == before.train_where and now.lengths == before.lengths
    assert now.stats.truncated + now.stats.dropped > 0, "rows over max_seq_length are among them"
