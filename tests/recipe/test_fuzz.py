"""Generated bad input (Hypothesis): mutated recipes and data rows are refused with a location that points
at the mutation, never accepted when invalid, never a traceback. See `mutations.py` for which mutation
must fail; `scripts/fuzz_inputs.py` runs the same properties far longer (figures in docs/measurements/reliability.md).

Examples are bounded for CI by the `ci` profile (FINETUNE_FUZZ_EXAMPLES overrides it).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import (
    DATA_SUFFIXES,
    FORMAT_ROWS,
    HOSTILE_JSON,
    HOSTILE_YAML,
    RECIPE,
    VALID,
    check_hostile,
    check_recipe,
    check_rows,
    emit,
    hostile_recipes,
    mutate_recipe,
    mutate_rows,
    write_rows,
)
from recipes_broken import make_workspace

from finetune.data.formats import to_judged
from finetune.data.preference import PreferenceStats, load_judged
from finetune.data.prepare import DataStats, load_samples
from finetune.errors import DataError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import FORMAT_FIELDS, DataSource, Recipe

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FINETUNE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,  # the same examples on every run: CI fails for a change, not for a draw
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CI = settings.get_profile("ci")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / RECIPE).write_text(emit(VALID)[0])
    return tmp_path


@pytest.fixture
def baseline(workspace):
    """The unmutated recipe, loaded: what strange-but-valid YAML must load to."""
    return load_recipe(RECIPE)


@CI
@given(rng=st.randoms(use_true_random=False))
def test_mutated_recipes_are_refused_at_the_mutated_key_or_load_the_same(workspace, baseline, rng):
    check_recipe(mutate_recipe(rng), workspace, baseline)


@CI
@given(rng=st.randoms(use_true_random=False), ending=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_mutated_data_rows_are_refused_at_their_line_or_read_and_always_counted(workspace, rng, ending):
    check_rows(mutate_rows(rng), workspace, ending)


def test_mutations_cover_every_kind_and_both_outcomes(workspace, baseline):
    """The generators reach every mutation, and the recipe side both refuses and accepts."""
    rng = random.Random(0)
    recipe_cases = [mutate_recipe(rng) for _ in range(200)]
    data_cases = [mutate_rows(rng) for _ in range(200)]
    assert {c.mutation for c in recipe_cases} == {"delete", "retype", "misspell", "move", "duplicate", "strange"}
    assert {c.mutation for c in data_cases} == {"drop_field", "change_type", "unknown_role", "insert_bytes", "cut_line",
                                                "hostile"}  # fmt: skip
    assert {c.note.split()[0] for c in data_cases if c.mutation == "hostile"} == set(HOSTILE_JSON)
    outcomes = {check_recipe(c, workspace, baseline) for c in recipe_cases[:40]}
    assert outcomes == {"refused", "accepted"}


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_recipes_through_the_cli_exit_2_with_the_location(workspace, seed):
    """A few of the same mutations through `finetune validate`: exit 2, the key and line, no traceback."""
    rng = random.Random(seed)
    case = mutate_recipe(rng)
    while case.must_fail is not True or not case.line:
        case = mutate_recipe(rng)
    (workspace / RECIPE).write_bytes(case.text)
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", RECIPE], cwd=workspace,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    assert f"{RECIPE}:{case.line}:" in result.stderr and case.key in result.stderr, (case, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


# --- hostile input (issue 28): generated from the schema and the format table -----------------------------


def test_hostile_values_at_every_schema_field_are_refused_at_their_line_quickly(workspace):
    """A lone surrogate, a 5,000-digit integer, .inf/.nan and 200-deep nesting at every field of the schema that
    takes them, and an alias bomb: each refused at its line (and key) within seconds, never another exception."""
    cases = hostile_recipes()
    kinds = {c.note.split(" at ")[0] for c in cases if " at " in c.note}
    fields = {c.note.split(" at ")[1].split("|")[0] for c in cases if " at " in c.note}
    assert kinds == set(HOSTILE_YAML) and len(fields) >= 60, (kinds, len(fields))
    assert {"model.base", "data.train[0].path", "data.chat_template", "output_dir", "train.lr"} <= fields
    for case in cases:
        check_hostile(case, workspace)


def kto_formats() -> list[str]:
    """The data formats the schema lets `method: kto` train on (asked of the schema, not listed here)."""
    accepted = []
    for fmt in FORMAT_FIELDS:
        data = {"name": "k", "model": {"base": "org/model"}, "train": {"method": "kto"},
                "data": {"train": [{"path": "x.jsonl", "format": fmt}]}}  # fmt: skip
        try:
            Recipe.model_validate(data)
        except ValueError:
            continue
        accepted.append(fmt)
    return accepted


@pytest.mark.parametrize("suffix", DATA_SUFFIXES)
@pytest.mark.parametrize("fmt", kto_formats())
def test_kto_reads_every_format_it_takes_from_every_file_type(tmp_path, fmt, suffix):
    """What KTO trains on reads the same from .jsonl, .json, .csv and .parquet, in each shape of the format
    (CSV: the shapes of flat text); a file holds one shape, as a table does."""
    for shape, row in enumerate(FORMAT_ROWS[fmt]):
        if suffix == ".csv" and not all(isinstance(v, str | bool) for v in row.values()):
            continue
        path = write_rows(tmp_path / f"train{shape}{suffix}", [row, row])
        source = DataSource(path=str(path), format=fmt)
        groups = load_judged([source], "error", PreferenceStats())
        expected = [to_judged(row, "w", source)] * 2
        assert [[(j.prompt, j.completion, j.desirable) for j in g] for g in groups] == [
            [(j.prompt, j.completion, j.desirable) for j in g] for g in expected
        ], (fmt, suffix, shape)


def test_kto_formats_are_asked_of_the_schema():
    assert set(kto_formats()) == {"unpaired", "preference"}


CELL = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=12)


@CI
@given(rows=st.lists(st.tuples(CELL, CELL.filter(str.strip)), min_size=1, max_size=4), at=st.integers(0, 10**6))
def test_csv_quoting_round_trips_and_a_stray_quote_is_refused_at_a_line_or_read(tmp_path, rows, at):
    """Cells with quotes, commas and line breaks, written by a CSV writer, read back exactly; the same file with a
    stray `"` inserted anywhere is read or refused naming file:line, never another exception."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["prompt", "completion"])
    writer.writerows(rows)
    path = tmp_path / "train.csv"
    path.write_text(out.getvalue(), encoding="utf-8", newline="")
    source = DataSource(path=str(path), format="completion")
    samples = load_samples([source], "error", DataStats())
    assert [(s.prompt, s.completion) for s in samples] == [tuple(r) for r in rows]
    text = out.getvalue()
    k = at % (len(text) + 1)
    path.write_text(text[:k] + '"' + text[k:], encoding="utf-8", newline="")
    for on_bad_row in ("error", "skip"):
        try:
            load_samples([source], on_bad_row, DataStats())
        except DataError as e:
            assert all(p.where.startswith(f"{path}:") for p in e.problems) or "no rows" in str(e), str(e)
