"""Structured-output metrics from the recipe: a JSON Schema file and a pattern; a broken schema file is named."""

from __future__ import annotations

import json

import pytest

from finetune.errors import UserError
from finetune.recipe.schema import EvalSection
from finetune.scoring import metric_functions
from finetune.scoring.structured import json_schema_metric, regex_metric

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["refund", "other"]}}, "required": ["label"]}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [('{"label": "refund"}', 1.0), ('{"label": "spam"}', 0.0), ("{}", 0.0), ("not json", 0.0), ('["refund"]', 0.0)],
)
def test_json_schema_scores_valid_json_against_the_file(tmp_path, answer, expected):
    path = tmp_path / "answer.schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert json_schema_metric(path)(answer, "unused") == expected


@pytest.mark.parametrize(
    ("content", "phrase"),
    [("{not json", "the schema file is not JSON"), ('{"type": "objekt"}', "not a valid JSON Schema")],
)
def test_a_broken_schema_file_is_named_before_anything_is_scored(tmp_path, content, phrase):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=phrase) as info:
        json_schema_metric(path)
    assert info.value.problems[0].where == str(path)


def test_validate_reports_a_broken_schema_file_at_its_key(tmp_path):
    from finetune.recipe.preflight import problems
    from finetune.recipe.schema import Recipe

    path = tmp_path / "bad.json"
    path.write_text('{"type": 3}')
    recipe = Recipe(name="x", model={"base": "m"}, data={"train": [{"path": "t.jsonl"}]},
                    eval={"metrics": ["json_schema"], "json_schema": str(path)})  # fmt: skip
    (problem,) = [p for p in problems(recipe) if p.key == "eval.json_schema"]
    assert "not a valid JSON Schema" in problem.message


def test_the_recipe_regex_replaces_the_reference_as_the_pattern():
    three_words = regex_metric("[a-z]+, [a-z]+, [a-z]+")
    assert three_words(" c, b, a\n", "ignored") == 1.0 and three_words("c, b", "c, b") == 0.0
    by_reference = metric_functions(["regex"], EvalSection())["regex"]
    assert by_reference("c, b", "c, b") == 1.0  # without eval.regex each reference is the pattern, as before
    assert metric_functions(["regex"], EvalSection(regex="x+"))["regex"]("c, b", "c, b") == 0.0
