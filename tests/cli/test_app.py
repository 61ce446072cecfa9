"""The CLI skeleton: help, version, validate (text, --json, --print, --set), schema, exit codes, lazy imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
import yaml
from recipes_broken import BROKEN, GOOD, RECIPE, THREE_MISTAKES, Broken, make_workspace, write
from typer.testing import CliRunner

from finetune import __version__
from finetune.cli import app
from finetune.recipe.schema import Recipe

COMMANDS = {
    "validate",
    "plan",
    "data",
    "train",
    "eval",
    "merge",
    "export",
    "runs",
    "schema",
    "sweep",
    "chat",
    "serve",
    "review",
    "reproduce",
}
runner = CliRunner()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINETUNE_DEBUG", raising=False)
    return tmp_path


@pytest.fixture
def good(workspace: Path) -> Path:
    return write(workspace, RECIPE, GOOD)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def error_line(where: str, key: str) -> str:
    """How `finetune validate` starts the stderr line of one problem."""
    return f"error: {' '.join(x for x in (where, key) if x)}: "


def assert_reported(stderr: str, expected: tuple[tuple[str, str, str], ...]) -> None:
    lines = stderr.splitlines()
    assert len(lines) == len(expected), stderr
    for line, (where, key, phrase) in zip(lines, expected, strict=True):
        assert line.startswith(error_line(where, key)), (line, where, key)
        assert phrase in line, (line, phrase)


def finetune_script() -> str:
    script = Path(sys.executable).parent / "finetune"
    found = str(script) if script.exists() else shutil.which("finetune")
    assert found, "the `finetune` console script is not installed next to this Python (pip install -e .)"
    return found


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_DEBUG"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


# --- help and version ----------------------------------------------------------------------------


def test_the_commands_are_the_contract():
    assert set(typer.main.get_command(app).commands) == COMMANDS


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"finetune {__version__}\n"


def test_version_through_the_console_script(tmp_path: Path):
    proc = run([finetune_script(), "--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"finetune {__version__}"


def test_root_help_has_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", [*sorted(COMMANDS), "runs list", "runs show", "runs compare"])
def test_every_command_has_help_with_an_example(command: str):
    result = invoke(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert f"finetune {command}" in result.stdout


# --- validate ----------------------------------------------------------------------------------------


def test_validate_good_recipe(good: Path):
    result = invoke("validate", RECIPE)
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: recipe.yaml\n"
    assert result.stderr == ""


def test_validate_bad_recipe_prints_located_lines_on_stderr(workspace: Path):
    (workspace / RECIPE).write_text(THREE_MISTAKES.text)
    result = invoke("validate", RECIPE)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: recipe.yaml:4:3 model.dtype: must be one of: auto, bfloat16, float16, float32 (got 'bf16'); "
        "did you mean 'bfloat16'?",
        "error: recipe.yaml:6:3 lora.rank: must be ≥ 1 (got 0)",
        "error: recipe.yaml:10:3 train.sheduler: unknown key; did you mean 'scheduler'?",
    ]


@pytest.mark.parametrize("case", BROKEN, ids=lambda case: case.id)
def test_validate_reports_each_broken_recipe(workspace: Path, case: Broken):
    (workspace / RECIPE).write_text(case.text)
    result = invoke("validate", RECIPE)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    assert "Traceback" not in result.output
    assert_reported(result.stderr, case.problems)


def test_validate_several_files_in_one_call(workspace: Path):
    write(workspace, "a.yaml", GOOD)
    write(workspace, "b.yaml", THREE_MISTAKES.text)
    write(workspace, "c.yaml", GOOD.replace("name: demo", "name: other"))
    result = invoke("validate", "a.yaml", "b.yaml", "c.yaml")
    assert result.exit_code == 2
    assert result.stdout == "ok: a.yaml\nok: c.yaml\n"
    assert [line.split(" ")[1] for line in result.stderr.splitlines()] == ["b.yaml:4:3", "b.yaml:6:3", "b.yaml:10:3"]

    all_good = invoke("validate", "a.yaml", "c.yaml")
    assert all_good.exit_code == 0
    assert all_good.stdout == "ok: a.yaml\nok: c.yaml\n"


def test_validate_missing_file(workspace: Path):
    result = invoke("validate", "nope.yaml")
    assert result.exit_code == 2
    assert result.stderr == "error: nope.yaml: cannot read file: No such file or directory\n"


def test_validate_needs_a_recipe():
    result = invoke("validate")
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_validate_json(workspace: Path):
    write(workspace, "a.yaml", GOOD)
    write(workspace, "b.yaml", THREE_MISTAKES.text)
    result = invoke("validate", "a.yaml", "b.yaml", "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["valid"] is False
    good, bad = report["recipes"]
    assert (good["path"], good["valid"], good["problems"]) == ("a.yaml", True, [])
    assert good["recipe"]["name"] == "demo"
    assert good["recipe"]["data"]["train"][0]["path"] == str(workspace / "data" / "train.jsonl")
    assert (bad["path"], bad["valid"], bad["recipe"]) == ("b.yaml", False, None)
    assert [{k: p[k] for k in ("where", "key")} for p in bad["problems"]] == [
        {"where": "b.yaml:4:3", "key": "model.dtype"},
        {"where": "b.yaml:6:3", "key": "lora.rank"},
        {"where": "b.yaml:10:3", "key": "train.sheduler"},
    ]
    assert "did you mean 'bfloat16'?" in bad["problems"][0]["message"]
    assert result.stderr == ""

    ok = invoke("validate", "a.yaml", "--json")
    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["valid"] is True


def test_validate_print_shows_the_resolved_recipe(workspace: Path):
    write(workspace, "base.yaml", "lora: {rank: 8, alpha: 4}\ntrain: {lr: 2e-5}\n")
    write(workspace, RECIPE, GOOD + "extends: base.yaml\n")
    result = invoke("validate", RECIPE, "--print", "--set", "lora.rank=32")
    assert result.exit_code == 0, result.output
    first, rest = result.stdout.split("\n", 1)
    assert first == "ok: recipe.yaml"
    resolved = yaml.safe_load(rest)
    assert "extends" not in resolved
    assert resolved["lora"]["rank"] == 32
    assert resolved["lora"]["alpha"] == 4
    assert resolved["train"]["lr"] == 2e-5
    assert resolved["model"]["base"] == str(workspace / "model")
    assert set(resolved) == set(Recipe.model_fields) - {"extends"}


def test_validate_set(good: Path):
    result = invoke("validate", RECIPE, "-s", "lora.rank=32", "--set", "train.lr=2e-5", "--json")
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipes"][0]["recipe"]
    assert recipe["lora"]["rank"] == 32
    assert recipe["train"]["lr"] == 2e-5


def test_validate_bad_set(good: Path):
    result = invoke("validate", RECIPE, "--set", "lora.rnak=32", "--set", "lora.rank")
    assert result.exit_code == 2
    assert sorted(result.stderr.splitlines()) == [
        "error: --set lora.rnak: unknown key; did you mean 'rank'?",
        "error: --set: expected key.path=value, got 'lora.rank'",
    ]


# --- schema -------------------------------------------------------------------------------------------


def test_schema_prints_json():
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema == Recipe.model_json_schema()
    assert {"model", "lora", "data", "train", "eval"} <= set(schema["properties"])


def test_schema_out_file(tmp_path: Path):
    out = tmp_path / "recipe.schema.json"
    result = invoke("schema", "-o", out)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert json.loads(out.read_text()) == Recipe.model_json_schema()
    assert invoke("schema", "--out", tmp_path / "again.json").exit_code == 0
    assert (tmp_path / "again.json").read_text() == out.read_text()


# --- errors ---------------------------------------------------------------------------------------------


def test_unexpected_error_exits_1_without_traceback(good: Path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("finetune.recipe.load.load_recipe", boom)
    result = invoke("validate", RECIPE)
    assert result.exit_code == 1
    assert result.stderr == "error: RuntimeError: boom\n(set FINETUNE_DEBUG=1 for the traceback)\n"


def test_bad_recipe_given_to_train_exits_2_before_any_work(workspace: Path):
    (workspace / RECIPE).write_text(THREE_MISTAKES.text)
    result = invoke("train", RECIPE)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0].startswith("error: recipe.yaml:4:3 model.dtype: ")
    assert not (workspace / "runs").exists()


# --- in a real process ------------------------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import sys
    import finetune.cli
    assert "torch" not in sys.modules, "import finetune.cli imported torch"
    try:
        finetune.cli.app(sys.argv[1:], prog_name="finetune")
        code = 0
    except SystemExit as e:
        code = e.code
    heavy = [m for m in ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes") if m in sys.modules]
    print("EXIT", code, "HEAVY", ",".join(heavy) or "none")
    """
)


def test_validate_does_not_import_torch(good: Path):
    proc = run([sys.executable, "-c", NO_TORCH, "validate", RECIPE], good.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ok: recipe.yaml", "EXIT 0 HEAVY none"]


def test_bad_recipes_exit_2_without_traceback_in_a_process(workspace: Path):
    names = []
    for case in [*BROKEN, THREE_MISTAKES]:
        names.append(f"{case.id}.yaml")
        (workspace / names[-1]).write_text(case.text)
    proc = run([finetune_script(), "validate", *names], workspace)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    named = {line.split(" ")[1].split(":")[0] for line in proc.stderr.splitlines()}
    assert named == set(names)
    assert all(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_good_recipe_exits_0_in_a_process(good: Path):
    proc = run([finetune_script(), "validate", RECIPE, "--json"], good.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["valid"] is True


HELP_WITHOUT_TORCH = textwrap.dedent(
    """
    import sys
    import finetune.cli
    for command in sys.argv[1:]:
        try:
            finetune.cli.app([*command.split(), "--help"], prog_name="finetune")
        except SystemExit as e:
            assert e.code == 0, (command, e.code)
    heavy = [m for m in ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes") if m in sys.modules]
    print("HEAVY", ",".join(heavy) or "none", file=sys.stderr)
    """
)


def test_help_of_every_command_imports_no_torch(tmp_path: Path):
    commands = ["", *sorted(COMMANDS), "runs list", "runs show", "runs compare"]
    proc = run([sys.executable, "-c", HELP_WITHOUT_TORCH, *commands], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "HEAVY none"


def test_python_dash_m_is_the_console_script(tmp_path: Path):
    proc = run([sys.executable, "-m", "finetune.cli", "--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"finetune {__version__}\n", proc.stderr


def test_every_module_of_the_cli_package_stays_small():
    """One module per command group (issue 27): none over 250 lines, so that no giant module of options grows back."""
    import finetune.cli

    sizes = {p.name: len(p.read_text().splitlines()) for p in Path(finetune.cli.__file__).parent.glob("*.py")}
    assert len(sizes) >= 10 and max(sizes.values()) <= 250, sizes
