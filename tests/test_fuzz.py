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
from mutations import RECIPE, VALID, check_recipe, check_rows, emit, mutate_recipe, mutate_rows
from recipes_broken import make_workspace

from finetune.loading import load_recipe

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
    assert {c.mutation for c in data_cases} == {"drop_field", "change_type", "unknown_role", "insert_bytes", "cut_line"}
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
