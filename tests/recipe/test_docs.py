"""Generated documents stay in sync with the schema they are generated from."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.recipe.docs import markdown
from finetune.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_reference_is_generated_from_the_schema():
    assert (ROOT / "docs" / "reference" / "recipe.md").read_text() == markdown(), (
        "run: finetune schema --markdown -o docs/reference/recipe.md"
    )


def test_json_schema_file_is_current():
    shipped = json.loads((ROOT / "recipe.schema.json").read_text())
    assert shipped == Recipe.model_json_schema(), "run: finetune schema -o recipe.schema.json"


def test_reference_lists_every_key_with_its_default():
    text = markdown()
    for section, model in (("lora", "rank"), ("train", "lr"), ("data", "train_on")):
        assert f"| `{model}` |" in text, (section, model)
    assert "| `rank` | int | `16` |" in text
