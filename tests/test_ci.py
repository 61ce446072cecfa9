"""The CI guide's GitHub Actions workflow and the pre-commit hook: they cannot run here, so their form is checked
and every `finetune` command they run is parsed by the real CLI (the commands are tested end to end elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from shared_docs import block_commands, parse_problem

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guides" / "ci.md"
HOOK_LANGUAGES = {"python", "system", "script", "docker", "docker_image"}


def _workflow() -> dict:
    """The guide's one `name: recipes` YAML block, as Actions reads it (PyYAML reads `on:` as True)."""
    blocks = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), re.S)
    (text,) = [b for b in blocks if b.startswith("name: recipes")]
    return yaml.safe_load(text)


def _commands(run: str) -> list[list[str]]:
    return [args for _, args in block_commands(f"```bash\n{run}\n```")]


def test_workflow_has_the_fields_actions_requires():
    workflow = _workflow()
    assert set(workflow[True]) == {"push", "pull_request"}  # `on:`
    assert set(workflow["jobs"]) == {"validate", "review", "train"}
    for name, job in workflow["jobs"].items():
        assert job.get("runs-on"), name
        assert job["steps"], name
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), (name, step)  # exactly one of them
            assert set(step) <= {"id", "name", "if", "uses", "with", "run", "env", "shell"}, (name, step)
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
    assert workflow["jobs"]["review"]["if"] == "github.event_name == 'pull_request'"
    assert workflow["jobs"]["review"]["steps"][0]["with"]["fetch-depth"] == 0  # the base commit is needed


def test_every_finetune_command_of_the_workflow_parses():
    runs = [step["run"] for job in _workflow()["jobs"].values() for step in job["steps"] if "run" in step]
    commands = [args for run in runs for args in _commands(run)]
    assert [args[0] for args in commands] == ["validate", "review", "train", "eval", "reproduce"]
    assert [(args, parse_problem(args)) for args in commands if parse_problem(args)] == []
    review = next(args for args in commands if args[0] == "review")
    assert "--markdown" in review and "--base" in review


def test_pre_commit_hook():
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    (hook,) = hooks
    assert {"id", "name", "entry", "language"} <= set(hook)
    assert hook["id"] == "finetune-validate" and hook["language"] in HOOK_LANGUAGES
    assert re.match(hook["files"], "recipes/quickstart.yaml") and not re.match(hook["files"], "configs/ddp.yaml")
    entry = hook["entry"].split()
    assert entry[0] == "finetune" and parse_problem([*entry[1:], "recipes/quickstart.yaml"]) is None
