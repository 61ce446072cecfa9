"""`module:function` in a recipe: found beside the recipe that names it, imported and checked by validate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from recipes_broken import GOOD, make_workspace, write

from finetune.errors import RecipeError
from finetune.recipe import callables
from finetune.recipe.load import load_recipe
from finetune.recipe.preflight import preflight

METRICS = """\
def first_word(prediction, reference):
    return float(prediction.split()[:1] == reference.split()[:1])


def one_argument(prediction):
    return 0.0


async def later(prediction, reference):
    return 1.0


def lazily(prediction, reference):
    yield 1.0


THRESHOLD = 0.5
"""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """An experiment folder: recipes/ with a metric module beside them, and an unrelated working directory."""
    make_workspace(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mymetrics_rel.py").write_text(METRICS)
    (tmp_path / "recipes" / "exits_at_import.py").write_text("import sys\n\nsys.exit(7)\n")
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def recipe_with(root: Path, metrics: str) -> Path:
    text = GOOD.replace("data/", "../data/").replace("./model", "../model")
    return write(root, "recipes/recipe.yaml", text + f"eval: {{metrics: {metrics}}}\n")


def test_a_metric_beside_the_recipe_is_found_from_any_working_directory(experiment, monkeypatch):
    monkeypatch.chdir(experiment / "elsewhere")
    recipe = load_recipe(recipe_with(experiment, "[loss, mymetrics_rel:first_word]"))
    preflight(recipe)  # imports it: no error
    spec = recipe.eval.metrics[1]
    assert spec == f"{experiment / 'recipes' / 'mymetrics_rel.py'}:first_word"  # the saved recipe finds it again
    assert callables.short_name(spec) == "mymetrics_rel:first_word"
    assert callables.load(spec, ("prediction", "reference"))("blue red", "blue green") == 1.0


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("mymetrics_rel:nope", "has no function 'nope'; it defines first_word, later, lazily, one_argument"),
        ("mymetrics_rel:later", "later is async: it must be a plain function"),
        ("mymetrics_rel:lazily", "lazily is a generator: it must be a plain function"),
        ("exits_at_import:f", "it called sys.exit(7) while being imported"),
        ("mymetrics_rel:one_argument", "one_argument(prediction) must take (prediction, reference)"),
        ("mymetrics_rel:THRESHOLD", "'THRESHOLD' in "),
        ("no_such_module_here:f", "no module 'no_such_module_here'"),
    ],
)
def test_validate_names_the_line_of_a_metric_that_will_not_work(experiment, monkeypatch, metric, message):
    monkeypatch.chdir(experiment / "elsewhere")
    recipe = load_recipe(recipe_with(experiment, f"[loss, {metric}]"))
    with pytest.raises(RecipeError) as info:
        preflight(recipe)
    (problem,) = info.value.problems
    assert problem.key == "eval.metrics[1]" and message in problem.message, problem
    assert problem.where == f"{experiment / 'recipes' / 'recipe.yaml'}:7:24", problem.where


def test_installed_modules_and_set_overrides_resolve_from_the_working_directory(experiment, monkeypatch):
    monkeypatch.chdir(experiment / "recipes")  # --set values are relative to the working directory
    recipe = load_recipe(recipe_with(experiment, "[loss]"), ["eval.metrics=[math:isclose, mymetrics_rel:first_word]"])
    assert recipe.eval.metrics[0] == "math:isclose"
    assert recipe.eval.metrics[1].endswith("recipes/mymetrics_rel.py:first_word")
    preflight(recipe)


def test_validate_imports_the_metric_and_finetune_itself_imports_no_torch(experiment):
    """The bug: validate said ok for a metric that training would fail to import after its last step."""
    recipe = recipe_with(experiment, "[loss, mymetrics_rel:nope]")
    probe = textwrap.dedent(
        """
        import sys
        from finetune.cli import app
        try:
            app(sys.argv[1:], prog_name="finetune")
        except SystemExit as e:
            print("EXIT", e.code, "torch" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe, "validate", str(recipe), "--json"],
                          cwd=experiment / "elsewhere", capture_output=True, text=True)  # fmt: skip
    report, last = proc.stdout.rsplit("\n", 2)[0], proc.stdout.splitlines()[-1]
    assert last == "EXIT 2 False", proc.stdout + proc.stderr
    (problem,) = json.loads(report)["recipes"][0]["problems"]
    assert problem["key"] == "eval.metrics[1]" and "has no function 'nope'" in problem["message"]


def test_a_model_directory_without_tokenizer_or_weights_is_named_by_validate(experiment, monkeypatch):
    monkeypatch.chdir(experiment)
    recipe = write(experiment, "recipe.yaml", GOOD)
    for name in ("tokenizer.json", "model.safetensors"):
        (experiment / "model" / name).unlink()
    (experiment / "model" / "pytorch_model.bin").write_text("")
    with pytest.raises(RecipeError) as info:
        preflight(load_recipe(recipe))
    (problem,) = info.value.problems
    assert problem.key == "model.base" and problem.where == "recipe.yaml:3:3"
    assert str(experiment / "model") in problem.message
    assert "no safetensors weights" in problem.message and "pytorch_model.bin is there" in problem.message
    assert "no tokenizer files (one of tokenizer.json, tokenizer.model" in problem.message


def test_a_tokenizer_without_chat_template_needs_data_chat_template(experiment, monkeypatch):
    monkeypatch.chdir(experiment)
    (experiment / "model" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"data.chat_template: the tokenizer in .* has no chat template"):
        preflight(load_recipe(write(experiment, "recipe.yaml", GOOD)))
    preflight(load_recipe(write(experiment, "recipe.yaml", GOOD), ["data.chat_template=chatml"]))


def test_train_refuses_a_broken_metric_before_importing_torch_or_claiming_the_run(experiment):
    """The bug: train ran every step and saved the adapter, then failed to import the metric."""
    recipe = recipe_with(experiment, "[loss, mymetrics_rel:one_argument]")
    probe = "import sys\nfrom finetune.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
    probe += "    print('EXIT', e.code, 'torch' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", probe, "train", str(recipe)], cwd=experiment / "elsewhere",
                          capture_output=True, text=True)  # fmt: skip
    assert proc.stdout.splitlines()[-1] == "EXIT 2 False", proc.stdout + proc.stderr
    assert "eval.metrics[1]: mymetrics_rel:one_argument: one_argument(prediction) must take" in proc.stderr
    assert not (experiment / "elsewhere" / "runs").exists() and not (experiment / "recipes" / "runs").exists()
