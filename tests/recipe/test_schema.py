"""The recipe language: schema, broken recipes located to file:line:col, extends, --set, paths, shipped files."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from recipes_broken import (
    BROKEN,
    GOOD,
    MIXED_MISTAKES,
    RECIPE,
    THREE_MISTAKES,
    Broken,
    make_workspace,
    write,
    yaml_text,
)

from finetune.errors import Problem, RecipeError
from finetune.recipe import yaml_source
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import (
    DataSection,
    DataSource,
    DpoOptions,
    EvalSection,
    EvalSplit,
    GrpoOptions,
    JudgeSection,
    KtoOptions,
    LoraInitSection,
    LoraSection,
    ModelSection,
    QuantizationSection,
    Recipe,
    TrainSection,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path with data/train.jsonl, data/eval.jsonl and model/config.json; also the working directory."""
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def assert_problems(problems: list[Problem], expected: tuple[tuple[str, str, str], ...]) -> None:
    """Exactly these problems, in this order: full `where` and `key`, and a phrase of each message."""
    assert [(p.where, p.key) for p in problems] == [(where, key) for where, key, _ in expected], problems
    for problem, (_, _, phrase) in zip(problems, expected, strict=True):
        assert phrase in problem.message, problem


# --- broken recipes -------------------------------------------------------------------------------


def test_the_table_is_large_enough():
    assert len(BROKEN) >= 30
    assert len({case.id for case in BROKEN}) == len(BROKEN), "case ids must be unique"


@pytest.mark.parametrize("case", BROKEN, ids=lambda case: case.id)
def test_broken_recipe_is_located(workspace: Path, case: Broken):
    (workspace / RECIPE).write_text(case.text)
    assert_problems(problems_of(RECIPE), case.problems)


def test_all_mistakes_of_a_file_are_reported_at_once(workspace: Path):
    (workspace / RECIPE).write_text(THREE_MISTAKES.text)
    problems = problems_of(RECIPE)
    assert len(problems) == 3
    assert_problems(problems, THREE_MISTAKES.problems)


def test_yaml_mistakes_do_not_hide_schema_mistakes(workspace: Path):
    (workspace / RECIPE).write_text(MIXED_MISTAKES.text)
    assert_problems(problems_of(RECIPE), MIXED_MISTAKES.problems)


def test_recipe_error_message_lists_every_problem_located(workspace: Path):
    (workspace / RECIPE).write_text(THREE_MISTAKES.text)
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPE)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "recipe.yaml:4:3 model.dtype: must be one of: auto, bfloat16, float16, float32 (got 'bf16'); "
        "did you mean 'bfloat16'?"
    )
    assert lines[1] == "recipe.yaml:6:3 lora.rank: must be ≥ 1 (got 0)"
    assert len(lines) == 3


def test_missing_recipe_file(workspace: Path):
    assert_problems(problems_of("nope.yaml"), (("nope.yaml", "", "cannot read file"),))


def test_a_directory_is_not_a_recipe(workspace: Path):
    assert_problems(problems_of("data"), (("data", "", "cannot read file"),))


def test_location_is_relative_to_working_directory_when_inside_it(workspace: Path, monkeypatch):
    write(
        workspace, "recipes/bad.yaml", THREE_MISTAKES.text.replace("./model", "../model").replace("data/", "../data/")
    )
    assert [p.where for p in problems_of("recipes/bad.yaml")] == [
        "recipes/bad.yaml:4:3",
        "recipes/bad.yaml:6:3",
        "recipes/bad.yaml:10:3",
    ]
    monkeypatch.chdir(workspace / "recipes")
    assert problems_of("bad.yaml")[0].where == "bad.yaml:4:3"
    monkeypatch.chdir(workspace.parent)
    assert problems_of(workspace / "recipes" / "bad.yaml")[0].where == f"{workspace.name}/recipes/bad.yaml:4:3"


# --- valid recipes ----------------------------------------------------------------------------------


def test_minimal_recipe_gets_schema_defaults(workspace: Path):
    recipe = load_recipe(write(workspace, RECIPE, GOOD))
    assert recipe.name == "demo"
    assert recipe.model.base == str(workspace / "model")
    assert recipe.data.train[0].path == str(workspace / "data" / "train.jsonl")
    assert recipe.lora == LoraSection()
    assert recipe.train == TrainSection()
    assert recipe.quantization.method == "none"
    assert recipe.run_dir == "runs/demo"


def test_scientific_notation_is_a_float(workspace: Path):
    """PyYAML reads `2e-5` as the string '2e-5'; recipes follow YAML 1.2."""
    write(workspace, RECIPE, GOOD + "train:\n  lr: 2e-5\n  weight_decay: 1E-2\n")
    recipe = load_recipe(RECIPE)
    assert recipe.train.lr == 2e-5
    assert isinstance(recipe.train.lr, float)
    assert recipe.train.weight_decay == 0.01


def test_yaml11_booleans_are_bools_where_a_bool_is_expected(workspace: Path):
    text = yaml_text(
        """
        name: demo
        model:
          base: ./model
          trust_remote_code: on
        quantization:
          method: nf4
          double_quant: no
        data:
          train: [{path: data/train.jsonl}]
          packing: yes
        train:
          gradient_checkpointing: off
        eval:
          compare_base: No
        """
    )
    recipe = load_recipe(write(workspace, RECIPE, text))
    assert recipe.model.trust_remote_code is True
    assert recipe.quantization.double_quant is False
    assert recipe.data.packing is True
    assert recipe.train.gradient_checkpointing is False
    assert recipe.eval.compare_base is False


def test_quoted_no_is_text(workspace: Path):
    recipe = load_recipe(write(workspace, RECIPE, GOOD.replace("name: demo", "name: 'no'")))
    assert recipe.name == "no"


def test_hub_ids_are_not_checked_for_existence(workspace: Path):
    text = yaml_text(
        """
        name: hub
        model: {base: meta-llama/Llama-3.1-8B-Instruct, revision: 0a1b2c3d}
        data:
          train:
            - {path: HuggingFaceH4/ultrachat_200k, split: train_sft}
          eval:
            - {path: tatsu-lab/alpaca, split: test}
        """
    )
    recipe = load_recipe(write(workspace, RECIPE, text))
    assert recipe.model.base == "meta-llama/Llama-3.1-8B-Instruct"
    assert recipe.data.train[0].path == "HuggingFaceH4/ultrachat_200k"
    assert recipe.data.eval[0].path == "tatsu-lab/alpaca"


def test_globs_and_builtin_templates_are_accepted(workspace: Path):
    text = GOOD.replace("data/train.jsonl", "data/*.jsonl") + "  chat_template: llama3\n"
    recipe = load_recipe(write(workspace, RECIPE, text))
    assert recipe.data.train[0].path == str(workspace / "data" / "*.jsonl")
    assert recipe.data.chat_template == "llama3"


def test_local_template_file_resolves(workspace: Path):
    write(workspace, "templates/mine.jinja", "{{ messages }}")
    recipe = load_recipe(write(workspace, RECIPE, GOOD + "  chat_template: templates/mine.jinja\n"))
    assert recipe.data.chat_template == str(workspace / "templates" / "mine.jinja")


def test_check_files_false_skips_existence(workspace: Path):
    write(workspace, RECIPE, GOOD.replace("data/train.jsonl", "data/later.jsonl"))
    recipe = load_recipe(RECIPE, check_files=False)
    assert recipe.data.train[0].path == str(workspace / "data" / "later.jsonl")


def test_eval_as_list_of_sources_and_split_ratio(workspace: Path):
    listed = load_recipe(write(workspace, "a.yaml", GOOD + "  eval:\n    - path: data/eval.jsonl\n"))
    assert listed.data.eval[0].path == str(workspace / "data" / "eval.jsonl")
    ratio = load_recipe(write(workspace, "b.yaml", GOOD + "  eval: {split_ratio: 0.1}\ntrain: {eval_every: 10}\n"))
    assert ratio.data.eval == EvalSplit(split_ratio=0.1)
    assert ratio.train.eval_every == 10


# --- relative paths ---------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_recipe_directory(tmp_path: Path, monkeypatch):
    project = make_workspace(tmp_path / "project")
    write(project, "recipes/r.yaml", GOOD.replace("./model", "../model").replace("data/", "../data/"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    monkeypatch.chdir(project)
    from_project = load_recipe("recipes/r.yaml")
    monkeypatch.chdir(elsewhere)
    from_elsewhere = load_recipe(project / "recipes" / "r.yaml")
    monkeypatch.chdir(project / "recipes")
    from_recipes = load_recipe("r.yaml")

    expected = str(project / "data" / "train.jsonl")
    assert from_project.data.train[0].path == from_elsewhere.data.train[0].path == expected
    assert from_recipes.data.train[0].path == expected
    assert from_project.model.base == from_elsewhere.model.base == str(project / "model")
    assert from_project.fingerprint() == from_elsewhere.fingerprint()


def test_output_dir_resolves_against_the_recipe_directory(tmp_path: Path, monkeypatch):
    project = make_workspace(tmp_path / "project")
    write(project, "r.yaml", GOOD + "output_dir: out/demo\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(project / "r.yaml")
    assert recipe.output_dir == str(project / "out" / "demo")
    assert recipe.run_dir == str(project / "out" / "demo")


# --- extends ----------------------------------------------------------------------------------------


BASE = yaml_text(
    """
    model:
      base: ./model
      dtype: bfloat16
    lora:
      rank: 8
      alpha: 16
      targets: [q_proj, k_proj, v_proj, o_proj]
    train:
      lr: 1.0e-4
    """
)


def test_extends_single_file(workspace: Path):
    write(workspace, "base.yaml", BASE)
    write(workspace, RECIPE, "extends: base.yaml\nname: child\ndata:\n  train: [{path: data/train.jsonl}]\n")
    recipe = load_recipe(RECIPE)
    assert recipe.model.dtype == "bfloat16"
    assert recipe.lora.rank == 8
    assert recipe.train.lr == 1e-4
    assert recipe.extends is None
    assert "extends" not in recipe.resolved()


def test_extends_deep_merges_extending_file_wins_lists_replace(workspace: Path):
    write(workspace, "base.yaml", BASE)
    text = yaml_text(
        """
        extends: base.yaml
        name: child
        lora:
          rank: 4
          targets: [v_proj]
        data:
          train: [{path: data/train.jsonl}]
        """
    )
    recipe = load_recipe(write(workspace, RECIPE, text))
    assert recipe.lora.rank == 4  # the extending file wins
    assert recipe.lora.alpha == 16  # kept from the base: sections merge key by key
    assert recipe.lora.targets == ["v_proj"]  # lists replace, never concatenate
    assert recipe.model.dtype == "bfloat16"
    assert recipe.model.base == str(workspace / "model")


def test_extends_list_later_files_win(workspace: Path):
    write(workspace, "a.yaml", "lora: {rank: 2, alpha: 2, dropout: 0.2}\nseed: 1\n")
    write(workspace, "b.yaml", "lora: {rank: 3, alpha: 3}\n")
    write(workspace, RECIPE, GOOD + "extends: [a.yaml, b.yaml]\nlora: {rank: 4}\n")
    recipe = load_recipe(RECIPE)
    assert (recipe.lora.rank, recipe.lora.alpha, recipe.lora.dropout, recipe.seed) == (4, 3.0, 0.2, 1)


def test_extends_chain_of_three_files(workspace: Path):
    write(workspace, "configs/a.yaml", "seed: 1\nlora: {rank: 1, alpha: 1, dropout: 0.1}\ntrain: {epochs: 1}\n")
    write(workspace, "configs/b.yaml", "extends: a.yaml\nseed: 2\nlora: {rank: 2, alpha: 2}\n")
    write(workspace, RECIPE, GOOD + "extends: configs/b.yaml\nseed: 3\n")
    recipe = load_recipe(RECIPE)
    assert recipe.seed == 3
    assert (recipe.lora.rank, recipe.lora.alpha, recipe.lora.dropout) == (2, 2.0, 0.1)
    assert recipe.train.epochs == 1


def test_extends_cycle_shows_the_cycle(workspace: Path):
    write(workspace, "a.yaml", "extends: b.yaml\nname: a\n")
    write(workspace, "b.yaml", "extends: [c.yaml]\n")
    write(workspace, "c.yaml", "seed: 1\nextends: a.yaml\n")
    assert_problems(
        problems_of("a.yaml"), (("c.yaml:2:1", "extends", "extends cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml"),)
    )


def test_extends_itself(workspace: Path):
    write(workspace, RECIPE, GOOD + "extends: ./recipe.yaml\n")
    assert_problems(problems_of(RECIPE), (("recipe.yaml:7:1", "extends", "extends cycle: recipe.yaml -> recipe.yaml"),))


def test_extends_missing_base_file(workspace: Path):
    write(workspace, RECIPE, GOOD + "extends: configs/nope.yaml\n")
    assert_problems(problems_of(RECIPE), (("recipe.yaml:7:1", "extends", "file not found: configs/nope.yaml"),))


def test_extends_must_name_files(workspace: Path):
    write(workspace, RECIPE, GOOD + "extends: {file: base.yaml}\n")
    assert_problems(problems_of(RECIPE), (("recipe.yaml:7:1", "extends", "must be a file path or a list"),))


def test_error_from_a_base_file_names_the_base_file_and_line(workspace: Path):
    write(workspace, "configs/base.yaml", "lora:\n  alpha: 16\n  rank: 0\n  dropuot: 0.1\n")
    write(workspace, RECIPE, GOOD + "extends: configs/base.yaml\ntrain: {epochs: 0}\n")
    assert_problems(
        problems_of(RECIPE),
        (
            ("configs/base.yaml:3:3", "lora.rank", "must be ≥ 1 (got 0)"),
            ("configs/base.yaml:4:3", "lora.dropuot", "did you mean 'dropout'?"),
            ("recipe.yaml:8:9", "train.epochs", "must be > 0"),
        ),
    )


def test_missing_top_level_key_is_blamed_on_the_recipe_given_not_its_base(workspace: Path):
    write(
        workspace, "base.yaml", "model: {base: ./model}\ndata:\n  train: [{path: data/train.jsonl}]\nlora: {rank: 4}\n"
    )
    write(workspace, RECIPE, "extends: base.yaml\nmodel: {dtype: auto}\n")
    assert_problems(problems_of(RECIPE), (("recipe.yaml", "name", "required: Run name"),))


def test_yaml_problem_in_a_base_file_names_the_base_file(workspace: Path):
    write(workspace, "base.yaml", "lora:\n  rank: 8\n  rank: 9\n")
    write(workspace, RECIPE, GOOD + "extends: base.yaml\n")
    assert_problems(problems_of(RECIPE), (("base.yaml:3:3", "lora.rank", "duplicate key (first set at line 2)"),))


def test_a_bad_base_value_overridden_by_the_extending_file_is_fine(workspace: Path):
    write(workspace, "base.yaml", "lora: {rank: 0}\n")
    recipe = load_recipe(write(workspace, RECIPE, GOOD + "extends: base.yaml\nlora: {rank: 8}\n"))
    assert recipe.lora.rank == 8


def test_relative_paths_in_a_base_file_resolve_against_its_directory(tmp_path: Path, monkeypatch):
    project = tmp_path / "project"
    make_workspace(project / "shared")  # shared/model, shared/data/...
    write(project, "shared/base.yaml", "model: {base: ./model}\ndata:\n  train: [{path: data/train.jsonl}]\n")
    write(project, "recipes/r.yaml", "extends: ../shared/base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(project / "recipes" / "r.yaml")
    assert recipe.model.base == str(project / "shared" / "model")
    assert recipe.data.train[0].path == str(project / "shared" / "data" / "train.jsonl")


def test_missing_file_named_in_a_base_file_is_located_there(workspace: Path):
    write(workspace, "configs/base.yaml", "data:\n  train:\n    - path: data/train.jsonl\n")
    write(workspace, RECIPE, "extends: configs/base.yaml\nname: demo\nmodel: {base: ./model}\n")
    # data/train.jsonl is looked for next to the base file, in configs/, where it is not
    assert_problems(
        problems_of(RECIPE),
        (("configs/base.yaml:3:7", "data.train[0].path", "file not found: data/train.jsonl (looked at configs/"),),
    )


# --- --set --------------------------------------------------------------------------------------------


@pytest.fixture
def good(workspace: Path) -> Path:
    return write(workspace, RECIPE, GOOD)


def test_set_is_typed_by_the_schema(good: Path):
    recipe = load_recipe(good, ["lora.rank=32", "train.lr=2e-5", "lora.targets=[q_proj,v_proj]", "lora.alpha=8"])
    assert recipe.lora.rank == 32 and type(recipe.lora.rank) is int
    assert recipe.train.lr == 2e-5 and type(recipe.train.lr) is float
    assert recipe.lora.targets == ["q_proj", "v_proj"]
    assert recipe.lora.alpha == 8.0


def test_set_null(workspace: Path):
    write(workspace, RECIPE, GOOD.replace("  base: ./model\n", "  base: ./model\n  revision: abc123\n"))
    assert load_recipe(RECIPE).model.revision == "abc123"
    assert load_recipe(RECIPE, ["model.revision=null"]).model.revision is None


def test_set_yaml11_boolean_where_a_bool_is_expected(good: Path):
    assert load_recipe(good, ["train.gradient_checkpointing=off"]).train.gradient_checkpointing is False


def test_set_into_a_list_item(good: Path):
    recipe = load_recipe(good, ["data.train.0.limit=5", "data.train.0.format=alpaca"])
    assert recipe.data.train[0].limit == 5
    assert recipe.data.train[0].format == "alpaca"
    assert recipe.data.train[0].path.endswith("train.jsonl")


def test_set_creates_a_section_absent_from_the_file(good: Path):
    recipe = load_recipe(good, ["quantization.method=nf4", "eval.metrics=[loss]"])
    assert recipe.quantization.method == "nf4"
    assert recipe.eval.metrics == ["loss"]


def test_set_last_one_wins(good: Path):
    assert load_recipe(good, ["lora.rank=4", "lora.rank=8"]).lora.rank == 8


def test_set_path_resolves_against_the_working_directory(good: Path, monkeypatch):
    monkeypatch.chdir(good.parent / "data")
    recipe = load_recipe(good, ["data.train.0.path=eval.jsonl"])
    assert recipe.data.train[0].path == str(good.parent / "data" / "eval.jsonl")


@pytest.mark.parametrize(
    "override, key, phrase",
    [
        ("lora.rnak=32", "lora.rnak", "did you mean 'rank'?"),
        ("trian.lr=1e-4", "trian", "did you mean 'train'?"),
        ("lora.rank=0", "lora.rank", "must be ≥ 1 (got 0)"),
        ("lora.rank=abc", "lora.rank", "must be a whole number (got 'abc')"),
        ("model.revision=no", "model.revision", "unquoted 'no' is a YAML 1.1 boolean"),
        ("lora.targets=attn", "lora.targets", "did you mean 'attention'?"),
        ("data.train.3.limit=5", "data.train.3.limit", "no item 3 in data.train (it has 1)"),
        ("data.train.0=[]", "data.train[0]", "must be a mapping of keys"),
        ("name.first=x", "name.first", "cannot set inside 'name': it is not a section"),
        ("extends=other.yaml", "extends", "cannot be set with --set"),
        ("lora.rank", "", "expected key.path=value, got 'lora.rank'"),
        ("=32", "", "expected key.path=value"),
        ("lora..rank=3", "", "expected key.path=value"),
        ("lora.rank=[1", "lora.rank", "invalid YAML"),
        ("lora={rank: 1, rank: 2}", "lora.rank", "duplicate key"),
    ],
)
def test_set_problems_are_reported_as_set(good: Path, override: str, key: str, phrase: str):
    assert_problems(problems_of(good, [override]), (("--set", key, phrase),))


def test_set_problems_come_after_file_problems(workspace: Path):
    write(workspace, RECIPE, GOOD + "lora: {rank: 0}\n")
    assert_problems(
        problems_of(RECIPE, ["train.lr=-1"]),
        (("recipe.yaml:7:8", "lora.rank", "must be ≥ 1"), ("--set", "train.lr", "must be > 0 (got -1)")),
    )


def test_set_can_fix_a_file_problem(workspace: Path):
    write(workspace, RECIPE, GOOD + "lora: {rank: 0}\n")
    assert load_recipe(RECIPE, ["lora.rank=2"]).lora.rank == 2


# --- the schema ---------------------------------------------------------------------------------------

SECTIONS = {
    Recipe,
    ModelSection,
    QuantizationSection,
    LoraSection,
    DataSection,
    DataSource,
    EvalSplit,
    TrainSection,
    DpoOptions,
    KtoOptions,
    GrpoOptions,
    EvalSection,
    JudgeSection,
    LoraInitSection,
}


def _models_in(annotation: typing.Any) -> set[type[BaseModel]]:
    found = set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.add(annotation)
    for arg in typing.get_args(annotation):
        found |= _models_in(arg)
    return found


def _all_sections() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo = [Recipe]
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.add(model)
            for field in model.model_fields.values():
                todo += _models_in(field.annotation)
    return seen


def test_walk_finds_every_section():
    assert _all_sections() == SECTIONS


@pytest.mark.parametrize("section", sorted(SECTIONS, key=lambda m: m.__name__), ids=lambda m: m.__name__)
def test_every_field_has_a_description(section: type[BaseModel]):
    missing = [name for name, field in section.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{section.__name__}: fields without a description: {missing}"


@pytest.mark.parametrize("section", sorted(SECTIONS, key=lambda m: m.__name__), ids=lambda m: m.__name__)
def test_every_section_is_strict_and_frozen(section: type[BaseModel]):
    assert section.model_config.get("extra") == "forbid"
    assert section.model_config.get("frozen") is True


def test_sections_forbid_extra_keys():
    with pytest.raises(ValidationError) as info:
        LoraSection.model_validate({"rnak": 8})
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(ValidationError):
        DataSource.model_validate({"path": "org/data", "formt": "alpaca"})


def test_recipe_is_frozen(workspace: Path):
    recipe = load_recipe(write(workspace, RECIPE, GOOD))
    with pytest.raises(ValidationError):
        recipe.lora.rank = 64
    with pytest.raises(ValidationError):
        recipe.name = "other"
    with pytest.raises(ValidationError):
        recipe.data.train[0].limit = 3
    assert recipe.lora.rank == 16


def test_json_schema_is_valid_json_with_the_sections():
    schema = json.loads(json.dumps(Recipe.model_json_schema()))
    assert schema["type"] == "object"
    assert {"name", "extends", "seed", "model", "quantization", "lora", "data", "train", "eval", "output_dir"} == set(
        schema["properties"]
    )
    assert set(schema["required"]) == {"name", "model", "data"}
    defs = schema["$defs"]
    for section in SECTIONS - {Recipe}:
        assert section.__name__ in defs
        assert defs[section.__name__].get("additionalProperties") is False
    assert defs["LoraSection"]["properties"]["rank"]["description"]


# --- the resolved recipe --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "quantization: {method: nf4, compute_dtype: bfloat16}\n",
        "quantization: {method: int8}\nlora: {targets: [q_proj]}\n",
        "train: {lr: 2e-5, eval_every: 5}\n",
    ],
    ids=["plain", "nf4", "int8", "eval"],
)
def test_resolved_recipe_validates_again_unchanged(workspace: Path, extra: str):
    """What a run writes to recipe.yaml must load back to the same recipe."""
    text = GOOD + "  eval: {split_ratio: 0.1}\n  max_seq_length: auto\n" + extra
    recipe = load_recipe(write(workspace, RECIPE, text))
    dumped = yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True)
    again = load_recipe(write(workspace, "resolved.yaml", dumped))
    assert again == recipe
    assert again.fingerprint() == recipe.fingerprint()


def test_fingerprint_ignores_key_order(workspace: Path):
    a = load_recipe(write(workspace, "a.yaml", GOOD + "lora: {rank: 8, alpha: 4}\n"))
    b = load_recipe(write(workspace, "b.yaml", "lora: {alpha: 4, rank: 8}\n" + GOOD))
    c = load_recipe(write(workspace, "c.yaml", GOOD + "lora: {rank: 9, alpha: 4}\n"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# --- shipped recipes and config fragments ---------------------------------------------------------------


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in folder.rglob(pattern))


SHIPPED_RECIPES = _yaml_files(ROOT / "recipes")
SHIPPED_CONFIGS = _yaml_files(ROOT / "configs")
MODELS = ROOT / "configs" / "models"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_shipped_folders_exist():
    assert (ROOT / "recipes").is_dir()
    assert (ROOT / "configs").is_dir()


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=_rel)
def test_shipped_recipe_validates(path: Path, monkeypatch):
    """Recipes, and sweep files (a `recipe:` key names the recipe they vary), which `finetune sweep` reads."""
    from finetune.sweep.file import is_sweep_file, load_sweep

    monkeypatch.chdir(ROOT)
    try:
        load_sweep(path) if is_sweep_file(path) else load_recipe(path)
    except RecipeError as e:
        pytest.fail(f"{_rel(path)} does not validate:\n{e}")


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=_rel)
def test_shipped_config_parses(path: Path, tmp_path: Path, monkeypatch):
    """Every config parses cleanly; a model fragment (configs/models/) also merges into a minimal recipe."""
    doc = yaml_source.load_file(path)
    assert doc.problems == [], f"{_rel(path)}: " + "; ".join(map(str, doc.problems))
    assert isinstance(doc.data, dict), f"{_rel(path)}: expected a mapping of keys"
    if not path.is_relative_to(MODELS):
        return  # e.g. accelerate / DeepSpeed configs: not recipe fragments
    minimal = write(
        tmp_path,
        "minimal.yaml",
        f"""
        extends: {json.dumps(str(path))}
        name: fragment-check
        model: {{base: org/model}}
        data:
          train: [{{path: org/dataset}}]
        """,
    )
    monkeypatch.chdir(tmp_path)
    try:
        load_recipe(minimal)
    except RecipeError as e:
        pytest.fail(f"{_rel(path)} does not merge into a minimal recipe:\n{e}")


def test_a_parent_run_that_does_not_exist_warns_in_validate_and_train_refuses_it_at_its_line(workspace: Path):
    """CI may validate a pipeline before its parent is trained (a warning); train stops before loading anything."""
    from finetune.lineage import ParentRunError, continue_parent
    from finetune.recipe.preflight import preflight

    write(workspace, RECIPE, GOOD.replace("  base: ./model\n", "  base: ./model\n  from_run: runs/sft\n"))
    recipe = load_recipe(RECIPE)
    with pytest.warns(UserWarning, match=r"recipe.yaml:4:3 model.from_run: runs/sft does not exist"):
        preflight(recipe)
    with pytest.raises(ParentRunError, match=r"^recipe.yaml:4:3 model.from_run runs/sft: not a run directory"):
        continue_parent(recipe)


def test_a_set_override_with_bytes_that_are_not_utf8_is_a_problem_not_a_crash(good: Path):
    """A shell passes undecodable argument bytes as lone surrogates (`--set $'na\\xffme=1'`)."""
    assert [(p.where, p.message) for p in problems_of(RECIPE, ["na\udcffme=1"])] == [
        ("--set", "the key holds bytes that are not UTF-8 text")
    ]
    (problem,) = problems_of(RECIPE, ["name=\udcff"])
    assert (problem.where, problem.key) == ("--set", "name") and "0xdcff is not allowed" in problem.message
