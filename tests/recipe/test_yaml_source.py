"""YAML with locations: 1-based file:line:col per key, duplicates refused, YAML 1.2 numbers, YAML 1.1 booleans."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from finetune.errors import Problem
from finetune.recipe.yaml_source import MAX_DEPTH, Ambiguous, Loc, display_path, dotted, load_file, parse


def value_of(text: str):
    doc = parse(f"x: {text}\n", "t.yaml")
    assert doc.problems == []
    return doc.data["x"]


def test_every_key_and_item_has_a_one_based_location():
    doc = parse("name: demo\nlora:\n  rank: 8\n  targets: [q_proj, v_proj]\nlist:\n  - a: 1\n  - b\n", "r.yaml")
    assert doc.problems == []
    assert doc.locs[("name",)] == Loc("r.yaml", 1, 1)
    assert doc.locs[("lora",)] == Loc("r.yaml", 2, 1)
    assert doc.locs[("lora", "rank")] == Loc("r.yaml", 3, 3)
    assert doc.locs[("lora", "targets", 0)] == Loc("r.yaml", 4, 13)
    assert doc.locs[("lora", "targets", 1)] == Loc("r.yaml", 4, 21)
    assert doc.locs[("list", 0)] == Loc("r.yaml", 6, 5)
    assert doc.locs[("list", 0, "a")] == Loc("r.yaml", 6, 5)
    assert doc.locs[("list", 1)] == Loc("r.yaml", 7, 5)


def test_loc_prints_like_an_editor():
    assert str(Loc("r.yaml", 3, 5)) == "r.yaml:3:5"
    assert str(Loc("r.yaml")) == "r.yaml"


def test_dotted_paths():
    assert dotted(("data", "train", 0, "path")) == "data.train[0].path"
    assert dotted(("lora",)) == "lora"
    assert dotted(()) == ""


def test_duplicate_key_is_an_error_and_the_first_is_kept():
    """PyYAML would silently keep the last one."""
    doc = parse("lora:\n  rank: 8\n  alpha: 16\n  rank: 64\n", "r.yaml")
    assert doc.problems == [Problem("duplicate key (first set at line 2); remove one", "r.yaml:4:3", "lora.rank")]
    assert doc.data == {"lora": {"rank": 8, "alpha": 16}}
    assert doc.locs[("lora", "rank")] == Loc("r.yaml", 2, 3)


def test_duplicate_key_inside_a_list_item():
    doc = parse("train:\n  - path: a\n    path: b\n", "r.yaml")
    assert doc.problems == [Problem("duplicate key (first set at line 2); remove one", "r.yaml:3:5", "train[0].path")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2e-5", 2e-5),
        ("2E-5", 2e-5),
        ("2.0e-4", 2e-4),
        ("1e3", 1000.0),
        ("-1.5", -1.5),
        (".5", 0.5),
        ("+3.", 3.0),
        ("16", 16),
        ("-4", -4),
        ("+7", 7),
        ("010", 10),  # YAML 1.1 (PyYAML) reads this as octal 8
        ("0", 0),
        ("0x2A", 42),  # YAML 1.2 core schema: hex and 0o octal are integers
        ("0o52", 42),
        ("0xff", 255),
    ],
)
def test_numbers_follow_yaml_1_2(text: str, expected):
    value = value_of(text)
    assert value == expected
    assert type(value) is type(expected)


def test_special_floats():
    assert value_of(".inf") == math.inf
    assert value_of("-.inf") == -math.inf
    assert math.isnan(value_of(".nan"))


@pytest.mark.parametrize("text", ["1_000", "0b101", "-0x10", "0x", "0o8", "1e", "1.2.3", "12abc", "e5", "v1.0"])
def test_not_numbers_stay_text(text: str):
    assert value_of(text) == text
    assert type(value_of(text)) is str


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_yaml_1_2_booleans(text: str, expected: bool):
    assert value_of(text) is expected


@pytest.mark.parametrize(
    "text, as_bool",
    [
        ("yes", True),
        ("no", False),
        ("on", True),
        ("off", False),
        ("Yes", True),
        ("NO", False),
        ("y", True),
        ("n", False),
    ],
)
def test_yaml_1_1_booleans_stay_ambiguous(text: str, as_bool: bool):
    """The schema decides later: a bool where a bool is expected, an error where text is."""
    value = value_of(text)
    assert isinstance(value, Ambiguous)
    assert value == text
    assert value.as_bool() is as_bool


@pytest.mark.parametrize("text", ["", "~", "null", "Null", "NULL"])
def test_nulls(text: str):
    assert value_of(text) is None


@pytest.mark.parametrize("text", ["'2e-5'", '"no"', "'null'", '"16"', "'true'", "!!str 16", "!!str no"])
def test_quoted_or_str_tagged_scalars_are_text(text: str):
    value = value_of(text)
    assert type(value) is str
    assert value == text.removeprefix("!!str ").strip("'\"")


def test_block_scalars_are_text():
    doc = parse("x: |\n  16\ny: >\n  no\n", "t.yaml")
    assert doc.data == {"x": "16\n", "y": "no\n"}
    assert type(doc.data["y"]) is str


@pytest.mark.parametrize(
    "text, expected",
    [("!!int 3", 3), ('!!int "3"', 3), ("!!float 1", 1.0), ("!!bool true", True), ('!!bool "false"', False)],
)
def test_explicit_standard_tags(text: str, expected):
    value = value_of(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["!!python/int 3", "!!int three", "!!bool yes", "!custom x", "!!binary aGk="])
def test_other_tags_are_refused_with_a_location(text: str):
    doc = parse(f"a: 1\nx: {text}\n", "t.yaml")
    assert len(doc.problems) == 1
    assert doc.problems[0].where == "t.yaml:2:4"
    assert doc.problems[0].key == "x"
    assert doc.problems[0].message.startswith("unsupported YAML tag or value:")


def test_merge_keys_are_refused():
    doc = parse("base: &b\n  rank: 4\nlora:\n  <<: *b\n  alpha: 8\n", "t.yaml")
    assert doc.problems == [Problem("YAML merge keys (<<) are not supported: use `extends:`", "t.yaml:4:3")]
    assert doc.data["lora"] == {"alpha": 8}


def test_explicitly_tagged_merge_key_is_refused():
    doc = parse("lora:\n  !!merge <<: {rank: 4}\n", "t.yaml")
    assert [p.message for p in doc.problems] == ["YAML merge keys (<<) are not supported: use `extends:`"]


def test_keys_are_taken_literally():
    """PyYAML turns the key `on` into True and `1` into an int; a key is always its text."""
    assert parse("on: 1\nno: 2\n1: 3\nnull: 4\n", "t.yaml").data == {"on": 1, "no": 2, "1": 3, "null": 4}


def test_quoted_double_angle_is_an_ordinary_key():
    assert parse("'<<': 1\n", "t.yaml").data == {"<<": 1}


def test_an_alias_bomb_is_refused_at_once_with_a_line():
    """Nine aliases of nine aliases ... expand to 9^9 values: refused after MAX_ALIAS_COPIES, not built."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    started = time.monotonic()
    doc = parse(bomb + "name: demo\n", "t.yaml")
    assert time.monotonic() - started < 5
    assert doc.data is None
    (problem,) = doc.problems
    assert problem.where.startswith("t.yaml:1:") and "aliases" in problem.message


def test_a_recursive_alias_is_refused():
    (problem,) = parse("a: &a [1, *a]\n", "t.yaml").problems
    assert problem.where.startswith("t.yaml:1:") and "refer to themselves" in problem.message


@pytest.mark.parametrize("depth", [150, 5000])
def test_deep_nesting_is_refused_with_a_line_not_a_recursion_error(depth: int):
    doc = parse("a: " + "[" * depth + "]" * depth + "\n", "t.yaml")
    (problem,) = doc.problems
    assert problem.where.startswith("t.yaml:1:") and f"nested more than {MAX_DEPTH} levels" in problem.message


def test_an_integer_beyond_pythons_digit_limit_is_a_located_problem():
    doc = parse("seed: 1\nx: " + "7" * 5000 + "\n", "t.yaml")
    assert [(p.where, p.key) for p in doc.problems] == [("t.yaml:2:4", "x")]
    assert "5000 digits is too large" in doc.problems[0].message


@pytest.mark.parametrize(
    "text",
    ['x: "a\\ud800b"\n', 'x: [ok, "\\udfff"]\n', '"\\ud800": 1\n', 'x: !!str "\\udc80"\n', "x: caf\udce9\n"],
)
def test_lone_surrogates_are_refused_where_they_were_written(text: str):
    """Escaped in a file, or a raw one: what `--set x=$'\\xe9'` makes of a non-UTF-8 argument."""
    doc = parse(text, "t.yaml")
    assert len(doc.problems) == 1 and doc.problems[0].where.startswith("t.yaml:1:"), doc.problems


def test_a_nul_byte_is_reported_at_its_line_and_column():
    doc = parse("a: 1\nb: x\x00y\n", "t.yaml")
    assert [p.where for p in doc.problems] == ["t.yaml:2:5"]
    assert "0x0000" in doc.problems[0].message


def test_anchors_and_aliases_copy_values():
    doc = parse("a: &targets [q_proj, v_proj]\nb: *targets\n", "t.yaml")
    assert doc.problems == []
    assert doc.data == {"a": ["q_proj", "v_proj"], "b": ["q_proj", "v_proj"]}
    assert doc.data["a"] is not doc.data["b"]


@pytest.mark.parametrize("text", ["[a, b]: 1\n", "? {a: 1}\n: 2\n", "'': 1\n"])
def test_keys_must_be_plain_names(text: str):
    doc = parse(text, "t.yaml")
    assert [p.message for p in doc.problems] == ["keys must be plain names"]
    assert doc.problems[0].where.startswith("t.yaml:1:")


@pytest.mark.parametrize(
    "text, where, reason",
    [
        ("a: 1\nb: [1, 2\n", "t.yaml:3:1", "expected ',' or ']'"),
        ("a:\n  b: 1\n c: 2\n", "t.yaml:3:2", "expected <block end>"),
        ("a: 1\n\tb: 2\n", "t.yaml:2:1", "found character '\\t' that cannot start any token"),
        ('a: "open\n', "t.yaml:2:1", "found unexpected end of stream"),
        ("a: b: c\n", "t.yaml:1:5", "mapping values are not allowed here"),
    ],
)
def test_invalid_yaml_reports_line_and_column(text: str, where: str, reason: str):
    doc = parse(text, "t.yaml")
    assert doc.data is None
    assert len(doc.problems) == 1
    assert doc.problems[0].where == where
    assert doc.problems[0].message.startswith("invalid YAML: ")
    assert reason in doc.problems[0].message


def test_several_documents_are_refused():
    doc = parse("a: 1\n---\nb: 2\n", "t.yaml")
    assert doc.data is None
    assert doc.problems == [Problem("expected one YAML document, found a second one (after ---) here", "t.yaml:3:1")]


@pytest.mark.parametrize("text", ["", "\n", "# just a comment\n", "---\n"])
def test_empty_documents(text: str):
    doc = parse(text, "t.yaml")
    assert doc.data is None
    assert doc.problems == []


def test_top_level_may_be_any_node():
    assert parse("- a\n- b\n", "t.yaml").data == ["a", "b"]
    assert parse("hello\n", "t.yaml").data == "hello"


def test_load_file_names_the_file_relative_to_the_working_directory(tmp_path: Path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text("a: 1\na: 2\n")
    monkeypatch.chdir(tmp_path)
    assert load_file(path).problems[0].where == "sub/r.yaml:2:1"
    assert display_path(path) == "sub/r.yaml"
    monkeypatch.chdir(tmp_path / "sub")
    assert load_file(path).problems[0].where == "r.yaml:2:1"
    outside = tmp_path.parent / "elsewhere-for-display-path"
    outside.mkdir(exist_ok=True)
    monkeypatch.chdir(outside)
    assert load_file(path).problems[0].where == f"{path}:2:1"


def test_load_file_missing_or_not_text(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = load_file(tmp_path / "nope.yaml")
    assert missing.data is None
    assert missing.problems == [Problem("cannot read file: No such file or directory", "nope.yaml")]
    (tmp_path / "bin.yaml").write_bytes(b"a: 1\nb: ok \xff\xfe\n")
    binary = load_file(tmp_path / "bin.yaml")
    assert binary.data is None
    assert [p.where for p in binary.problems] == ["bin.yaml:2:7"]
    assert binary.problems[0].message.startswith("not a UTF-8 text file: byte 0xff")


@pytest.mark.parametrize(
    "text", ["1234e56", "no", "on", "null", "~", "42", "-1.5", ".inf", "true", "plain", "a: b", "0x2A", "0o7"]
)
def test_dump_quotes_what_would_not_read_back_as_text(text):
    from finetune.recipe.yaml_source import dump, parse

    data = {"revision": text, "nested": [{"x": text}]}
    assert parse(dump(data), "t.yaml").data == data
