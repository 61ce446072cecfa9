"""Data files as real pipelines write them: encodings, line endings, broken, empty and absurd files.

Each case is read through `load_samples` (what `finetune train` and `finetune data` call) and must
give either the rows, or a DataError naming the file, the row and what was expected; with
`on_bad_row: skip` every refused row is counted under its reason.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from finetune.data import sources
from finetune.data.formats import MAX_TURNS
from finetune.data.prepare import DataStats, load_samples
from finetune.errors import DataError
from finetune.recipe.schema import DataSource

ROWS = [
    {"messages": [{"role": "user", "content": f"Reverse: a{i} b{i}"}, {"role": "assistant", "content": f"b{i} a{i}"}]}
    for i in range(3)
]
COMPLETION = [{"prompt": f"Reverse: a{i} b{i} ->", "completion": f" b{i} a{i}"} for i in range(3)]
EXPECTED_MESSAGES = [tuple((t["role"], t["content"]) for t in r["messages"]) for r in ROWS]


def read(path: Path, fmt: str = "messages", skip: bool = False) -> tuple[list, DataStats]:
    stats = DataStats()
    samples = load_samples([DataSource(path=str(path), format=fmt)], "skip" if skip else "error", stats)
    return samples, stats


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["no-bom", "bom"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_with_or_without_bom_and_any_line_ending_reads_the_same_rows(tmp_path, bom, newline, suffix):
    if suffix == ".csv":
        text, fmt, rows = csv_text(COMPLETION), "completion", COMPLETION
    else:
        rows, fmt = ROWS, "messages"
        text = jsonl(ROWS) if suffix == ".jsonl" else json.dumps(ROWS, indent=1)
    path = tmp_path / f"train{suffix}"
    path.write_bytes(bom + text.replace("\r\n", "\n").replace("\n", newline).encode())
    samples, stats = read(path, fmt)
    if fmt == "messages":
        assert [s.messages for s in samples] == EXPECTED_MESSAGES
    else:
        assert [(s.prompt, s.completion) for s in samples] == [(r["prompt"], r["completion"]) for r in rows]
    assert stats.sources[0].rows == 3 and stats.sources[0].skipped == 0
    if suffix != ".json":  # rows are named by their line, whatever the line ending
        assert samples[-1].where.endswith(f"train{suffix}:{4 if suffix == '.csv' else 3}")


def test_parquet_folder_and_glob_read_every_file(tmp_path):
    import pyarrow as pa
    from pyarrow import parquet

    folder = tmp_path / "shards"
    folder.mkdir()
    parquet.write_table(pa.Table.from_pylist(ROWS[:2]), folder / "a.parquet")
    (folder / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(ROWS[2:]).encode())
    (folder / "notes.txt").write_text("not data")
    samples, _ = read(folder)
    assert [s.messages for s in samples] == EXPECTED_MESSAGES
    samples, _ = read(tmp_path / "shards" / "*.parquet")
    assert [s.where for s in samples] == [f"{folder / 'a.parquet'}:row 1", f"{folder / 'a.parquet'}:row 2"]


def latin1_line() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "café"}, {"role": "assistant", "content": "x"}]},
                      ensure_ascii=False).encode("latin-1")  # fmt: skip


def test_a_latin1_line_is_refused_naming_file_line_and_byte_or_skipped_and_counted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(ROWS[:2]).encode() + latin1_line() + b"\n" + jsonl(ROWS[2:]).encode())
    with pytest.raises(DataError) as e:
        read(path)
    (problem,) = e.value.problems
    assert problem.where == f"{path}:3"
    column = latin1_line().index(b"\xe9") + 1
    assert (
        f"not UTF-8 text: byte 0xe9 at column {column}" in problem.message
        and "save the file as UTF-8" in problem.message
    )
    samples, stats = read(path, skip=True)
    assert len(samples) == 3 and stats.sources[0].skipped_by_reason == {"not_utf8": 1}


def test_latin1_in_csv_and_json_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(csv_text(COMPLETION).encode() + "café,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.csv:5: not UTF-8 text"):
        read(path, "completion")
    assert read(path, "completion", skip=True)[1].sources[0].skipped_by_reason == {"not_utf8": 1}
    path = tmp_path / "train.json"
    path.write_bytes(json.dumps(ROWS, indent=1).encode()[:-2] + b',\n"caf\xe9"]')
    with pytest.raises(DataError, match=rf"{path.name}:\d+: not UTF-8 text: byte 0xe9"):
        read(path)


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".jsonl", b"", "empty file (0 bytes); expected one JSON object per line"),
        (".jsonl", b"\n  \r\n\n", "no rows: the file is empty or holds only blank lines"),
        (".jsonl", b"\xef\xbb\xbf\n", "no rows"),
        (".json", b"", "empty file (0 bytes)"),
        (".json", b"  \n", "no rows: the file holds only blank space"),
        (".json", b"[]", "no rows"),
        (".csv", b"", "empty file (0 bytes); expected a header line"),
        (".csv", b"prompt,completion\n", "no rows"),
        (".parquet", b"", "empty file (0 bytes)"),
    ],
)
def test_an_empty_file_is_refused_naming_it(tmp_path, suffix, content, message):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read(path, "completion" if suffix == ".csv" else "messages", skip=True)  # skipping cannot hide it
    assert e.value.problems[0].where == str(path) and message in e.value.problems[0].message


def test_truncated_files_name_the_place_where_they_end(tmp_path):
    whole = jsonl(ROWS).encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(whole[: len(whole) - 15])
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        read(path)
    path = tmp_path / "train.json"
    text = json.dumps(ROWS, indent=1).encode()
    path.write_bytes(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"train\.json:\d+: invalid JSON: .* \(the file ends early: truncated\?\)"):
        read(path)
    import pyarrow as pa
    from pyarrow import parquet

    path = tmp_path / "train.parquet"
    parquet.write_table(pa.Table.from_pylist(ROWS), path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"train\.parquet: not a readable Parquet file \(truncated"):
        read(path)
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\n"a","b"\n"c,"d\n')
    with pytest.raises(DataError, match=r"train\.csv:3: "):
        read(path, "completion")


@pytest.mark.parametrize(
    ("line", "reason", "message"),
    [
        (b"[1, 2]", "not_an_object", "expected an object with fields, got list"),
        (b'"just text"', "not_an_object", "got str"),
        (b"12", "not_an_object", "got int"),
        (b'{"messages": "hi"}', "wrong_type", "'messages' must be a non-empty list"),
        (b'{"messages": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}]}', "unknown_role",
         "unknown role 'human'; roles are system, user, assistant (ShareGPT's human/gpt"),
        (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}', "wrong_type",
         "content must be text, got int"),
        (b"[" * 100_000, "invalid_json", "invalid JSON"),
        (b'{"n": ' + b"9" * 5000 + b"}", "invalid_json", "invalid JSON"),
        (b"{'single': 'quotes'}", "invalid_json", "invalid JSON: Expecting property name"),
    ],
)  # fmt: skip
def test_wrong_types_and_roles_name_the_line_and_are_counted_by_reason(tmp_path, line, reason, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(ROWS[:1]).encode() + line + b"\n" + jsonl(ROWS[1:]).encode())
    with pytest.raises(DataError) as e:
        read(path)
    assert e.value.problems[0].where == f"{path}:2" and message in e.value.problems[0].message
    samples, stats = read(path, skip=True)
    assert len(samples) == 3 and stats.sources[0].skipped_by_reason == {reason: 1}


def test_wrong_column_types_in_parquet_name_the_record(tmp_path):
    import pyarrow as pa
    from pyarrow import parquet

    path = tmp_path / "train.parquet"
    parquet.write_table(
        pa.Table.from_pylist([{"prompt": "a", "completion": 1}, {"prompt": "c", "completion": 7}]), path
    )
    with pytest.raises(DataError) as e:
        read(path, "completion")
    assert e.value.problems[0].where == f"{path}:row 1" and "'completion' must be text, got int" in str(e.value)
    assert read(path, "completion", skip=True)[1].sources[0].skipped_by_reason == {"wrong_type": 2}


def test_a_50_mb_line_and_a_10000_turn_row_are_refused_by_documented_limits(tmp_path):
    huge = {"messages": [{"role": "user", "content": "x" * (50 * 2**20)}, {"role": "assistant", "content": "y"}]}
    turns = [{"role": r, "content": "z"} for _ in range(5000) for r in ("user", "assistant")]
    path = tmp_path / "train.jsonl"
    path.write_text(
        jsonl(ROWS[:1]) + json.dumps(huge) + "\n" + json.dumps({"messages": turns}) + "\n" + jsonl(ROWS[1:])
    )
    with pytest.raises(DataError) as e:
        read(path)
    assert e.value.problems[0].where == f"{path}:2" and "line longer than 16 MiB" in e.value.problems[0].message
    samples, stats = read(path, skip=True)
    assert len(samples) == 3 and stats.sources[0].skipped_by_reason == {"too_large": 1, "too_many_turns": 1}
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match=rf"10000 turns; at most {MAX_TURNS} per row"):
        read(path)


def test_a_json_document_that_is_not_a_list_says_what_it_is(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"data": []}')
    with pytest.raises(DataError, match=r"must hold a list of rows .*, got an object"):
        read(path)


def test_every_row_is_either_kept_or_counted(tmp_path):
    lines = [*[json.dumps(r) for r in ROWS], "{bad", '{"messages": []}', "", '{"prompt": 1}', "   "]
    path = tmp_path / "train.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n")
    samples, stats = read(path, skip=True)
    non_blank = sum(bool(line.strip()) for line in lines)
    assert stats.sources[0].rows + stats.sources[0].skipped == non_blank == len(samples) + 3
    assert stats.sources[0].skipped_by_reason == {"invalid_json": 1, "wrong_type": 1, "missing_field": 1}


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(ROWS))
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataError, match=r"train\.jsonl: cannot read the file \(Permission denied\)"):
        read(path)
    with pytest.raises(DataError, match=r"train\.jsonl: cannot read the file"):
        sources.fingerprint(DataSource(path=str(path)))


def test_finetune_data_answers_a_latin1_line_and_a_bom(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Through the CLI (in-process): exit 2 naming file and line; with skip, counted by reason; the BOM line read.
    (The empty file's answer is the same DataError, checked in-process above.)"""
    import shutil

    from typer.testing import CliRunner

    from finetune.cli import app

    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + jsonl(ROWS[:2]).encode() + latin1_line() + b"\r\n" + jsonl(ROWS[2:]).encode())
    (tmp_path / "r.yaml").write_text("name: t\nmodel: {base: tok}\ndata:\n  train: [{path: train.jsonl}]\n")
    monkeypatch.chdir(tmp_path)

    def run(*args: str):
        return CliRunner().invoke(app, ["data", "r.yaml", "--show", "0", *args])

    refused = run()
    assert refused.exit_code == 2 and "Traceback" not in refused.stderr
    assert "error: train.jsonl:3: not UTF-8 text: byte 0xe9" in refused.stderr
    skipped = run("--set", "data.on_bad_row=skip")
    assert skipped.exit_code == 0, skipped.stderr
    assert "3 rows (1 skipped: 1 not_utf8)" in skipped.stdout  # the BOM line 1 is a row like the others


# --- bad input found by generated tests (issue 28) ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('prompt,completion\n"abc,"Reverse: c","d, c"\nok,fine\n', 2, "',' expected after '\"'"),
        ('prompt,completion\nok,fine\n"Reverse: a b","b a\n', 3, "the file ends inside a quoted cell"),
    ],
    ids=["stray-quote", "cut-inside-a-quoted-cell"],
)
def test_csv_with_broken_quoting_is_refused_at_the_line_it_starts(tmp_path, text, line, message):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read(path, "completion")
    assert e.value.problems[0].where == f"{path}:{line}" and message in str(e.value)
    samples, stats = read(path, "completion", skip=True)
    assert [s.prompt for s in samples] == ["ok"] and stats.sources[0].skipped_by_reason == {"invalid_csv": 1}


def test_a_parquet_date_beyond_pythons_range_in_an_unused_column_does_not_stop_the_file(tmp_path):
    import pyarrow as pa
    from pyarrow import parquet

    path = tmp_path / "train.parquet"
    dates = pa.array([2**31 - 1, 0], type=pa.date32())  # year 5,881,580: beyond datetime.date
    parquet.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"], "added": dates}), path)
    samples, _ = read(path, "completion")
    assert [(s.prompt, s.completion) for s in samples] == [("a", "x"), ("b", "y")]


def test_a_lone_surrogate_escape_in_jsonl_names_the_line_or_is_skipped_as_not_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\ud800"}]}
    path.write_text(jsonl(ROWS[:1]) + json.dumps(bad) + "\n")  # json.dumps writes it as the escape \ud800
    with pytest.raises(DataError) as e:
        read(path)
    assert e.value.problems[0].where == f"{path}:2" and "lone surrogate" in str(e.value)
    samples, stats = read(path, skip=True)
    assert len(samples) == 1 and stats.sources[0].skipped_by_reason == {"not_utf8": 1}
