"""The quickstart, as a new user runs it: the shipped model learns the shipped task, and eval agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
pytestmark = pytest.mark.slow


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "finetune.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_quickstart_tunes_the_model_far_past_its_base_and_eval_agrees(tmp_path, monkeypatch):
    trained = finetune("train", str(RECIPE), "--json", cwd=tmp_path)  # from another directory than the repo's
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout)["eval"]
    tuned, base = summary["tuned"], summary["base"]
    assert base["metrics"]["exact_match"] <= 0.1
    assert tuned["metrics"]["exact_match"] >= 0.8, tuned
    assert tuned["loss"] < base["loss"]

    run = tmp_path / "runs" / "quickstart"
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.chdir(tmp_path)  # eval in-process: training above ran as a new user runs it
    evaluated = CliRunner().invoke(app, ["eval", str(run), "--json", "--require", "exact_match>=0.8"])
    assert evaluated.exit_code == 0, evaluated.output[-3000:]
    again = json.loads(evaluated.stdout)
    assert again["tuned"]["metrics"]["exact_match"] == tuned["metrics"]["exact_match"]
    assert again["base"]["metrics"]["exact_match"] == base["metrics"]["exact_match"]
    assert again["tuned"]["loss"] == pytest.approx(tuned["loss"], abs=1e-4)
