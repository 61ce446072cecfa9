"""Runs you can trust: exact resume after SIGKILL, clean stop on SIGTERM, NaN stop, no secret on disk."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import finetune, losses, write_recipe
from training import adapter_tensors, start, wait_for_step

RESUMABLE = """\
data:
  train: [{path: data/train.jsonl}]
  max_seq_length: 64
"""


def recipe_for_resume(tmp_path: Path, model_dir: Path) -> Path:
    """24 steps with dropout (so RNG state matters) and a checkpoint every 4 steps."""
    path = write_recipe(tmp_path, model_dir)
    text = path.read_text().replace("max_steps: 8", "max_steps: 24\n  save_every: 4")
    path.write_text(text.replace("lora: {rank: 8, alpha: 16}", "lora: {rank: 8, alpha: 16, dropout: 0.1}"))
    return path


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_ends_with_the_same_adapter(tiny_model_dir, tmp_path):
    recipe = recipe_for_resume(tmp_path, tiny_model_dir())
    full = finetune("train", str(recipe), "--set", "output_dir=runs/full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    kill_at = random.Random().randint(5, 21)
    proc = start(recipe, tmp_path, "--set", "output_dir=runs/killed")
    run = tmp_path / "runs" / "killed"
    wait_for_step(run, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"

    resumed = finetune("train", str(recipe), "--set", "output_dir=runs/killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumes"][0]["from_step"] <= kill_at
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, (kill_at, name)
    assert losses(run) == pytest.approx(losses(tmp_path / "runs" / "full"), abs=1e-6), kill_at


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_marks_interrupted_and_exits_3(tiny_model_dir, tmp_path):
    recipe = recipe_for_resume(tmp_path, tiny_model_dir())
    proc = start(recipe, tmp_path, "--set", "train.max_steps=100000", "--set", "train.save_every=100000")
    run = tmp_path / "runs" / "tiny"
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "Traceback" not in stderr and "error:" not in stderr  # the graceful path
    command = f"finetune train {recipe} --set train.max_steps=100000 --set train.save_every=100000 --resume"
    assert stderr.rstrip().endswith(f"checkpoint saved; continue with: {command}"), stderr[-1000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) >= 3


def test_resume_refuses_a_recipe_that_changed_what_is_trained(tiny_model_dir, tmp_path):
    recipe = recipe_for_resume(tmp_path, tiny_model_dir())
    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    from finetune.recipe.load import load_recipe
    from finetune.runs import Manifest, RunDir, write_recipe

    os.chdir(tmp_path)
    original = load_recipe(recipe)
    write_recipe(RunDir(run), original)
    Manifest.start(RunDir(run), original).update(status="interrupted")  # this process is alive: not "running"
    result = finetune("train", str(recipe), "--resume", "--set", "lora.rank=4", "--set", "train.lr=1e-3", cwd=tmp_path)
    assert result.returncode == 2
    assert "the recipe changed in lora.rank, train.lr" in result.stderr
    allowed = finetune("train", str(recipe), "--resume", "--overwrite", cwd=tmp_path)
    assert allowed.returncode == 2 and "contradict" in allowed.stderr


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir())
    result = finetune("train", str(recipe), "--set", "train.lr=1e30", "--set", "train.max_grad_norm=1e30", cwd=tmp_path)
    assert result.returncode == 1
    assert "is nan at step" in result.stderr or "is inf at step" in result.stderr, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "at step" in manifest["error"]
    logged = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert logged, "the steps before the NaN are logged"


@pytest.mark.slow
def test_planted_secrets_reach_no_file_of_the_run(tiny_model_dir, tmp_path, monkeypatch):
    env_token = "hf_" + "e" * 34
    recipe_token = "hf_" + "r" * 34
    recipe = write_recipe(tmp_path, tiny_model_dir())
    recipe.write_text(recipe.read_text().replace("name: tiny", f"name: tiny\n# token {recipe_token}"))
    (tmp_path / "data" / "train.jsonl").rename(tmp_path / "data" / f"{recipe_token}.jsonl")
    recipe.write_text(recipe.read_text().replace("data/train.jsonl", f"data/{recipe_token}.jsonl"))
    monkeypatch.setenv("HF_TOKEN", env_token)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2)
    result = finetune("train", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for secret in (env_token, recipe_token, "0123456789abcdef" * 2):
                assert secret.encode() not in content, path
    for stream in (result.stdout, result.stderr):
        assert env_token not in stream and "0123456789abcdef" * 2 not in stream


@pytest.mark.slow
def test_too_little_disk_space_is_refused_before_training_and_a_retry_needs_no_overwrite(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A run that failed before its first step holds nothing to lose: the retry reuses its directory.

    The retry also trains with a metric module kept beside the recipe, run from another directory.
    """
    from finetune.errors import RunDirError
    from finetune.recipe.load import load_recipe
    from finetune.train import train

    path = write_recipe(tmp_path, tiny_model_dir())
    (tmp_path / "mymetrics_retry.py").write_text("def first(prediction, reference):\n    return 1.0\n")
    path.write_text(
        path.read_text().replace("max_new_tokens: 6", "max_new_tokens: 6\n  metrics: [loss, mymetrics_retry:first]")
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = load_recipe(path, ["train.max_steps=2"])
    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as m:
        m.setattr("finetune.train.shutil.disk_usage", lambda p: usage._replace(free=1024))
        with pytest.raises(RunDirError, match="GiB free, but checkpoints and adapters need about"):
            train(recipe, progress=False)
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    result = train(recipe, progress=False)  # no overwrite needed
    assert result.steps == 2 and result.eval.tuned.metrics["mymetrics_retry:first"] == 1.0
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"


def test_a_model_directory_without_tokenizer_files_is_refused_before_claiming_the_run(tiny_model_dir, tmp_path):
    """The bug: a raw transformers ValueError naming no directory, exit 1, and a claimed run directory."""
    model = tmp_path / "model-without-tokenizer"
    shutil.copytree(tiny_model_dir(), model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    recipe = write_recipe(tmp_path, model)
    for command in ("validate", "train"):
        result = finetune(command, str(recipe), cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"model.base: {model} has no tokenizer files (one of tokenizer.json" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_shown_dead_and_resumes_from_step_0(tiny_model_dir, tmp_path):
    """The bug: `--resume` said "no complete checkpoint" forever and `runs list` said `running` forever."""
    from finetune.errors import UserError
    from finetune.runs import RunDir, list_runs, open_run, show_run

    recipe = recipe_for_resume(tmp_path, tiny_model_dir())
    started = ("--set", "train.save_every=100", "--set", "train.max_steps=12", "--set", "eval.compare_base=false")
    proc = start(recipe, tmp_path, *started)
    run = tmp_path / "runs" / "tiny"
    wait_for_step(run, 3, proc, timeout=600)  # a loaded machine can take minutes to start
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [r.status for r in list_runs(tmp_path / "runs")] == ["died"]
    command = f"finetune train {recipe} {' '.join(started)} --resume"
    assert command in show_run(run)["status_detail"]
    with pytest.raises(UserError, match="its training process died") as info:
        open_run(run)  # what `finetune merge` and `finetune eval` say
    assert info.value.problems[0].message.endswith(command)
    with pytest.raises(UserError, match="already exists; pass --overwrite") as info:
        RunDir(run).refuse_existing(False, command.removesuffix(" --resume"))  # `finetune train` without --resume
    assert info.value.problems[0].message.endswith(f"the run there is died: continue it with: {command}")

    resumed = finetune(*shlex.split(command)[1:], cwd=tmp_path)  # the suggested command, as given
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "has no complete checkpoint (train.save_every is 100; the" in resumed.stderr
    assert "starting it from step 0" in resumed.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps"] == 12
    assert [r["from_step"] for r in manifest["resumes"]] == [0]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 1  # one clean curve from step 0, not two

    again = finetune(*shlex.split(command)[1:], cwd=tmp_path)
    assert again.returncode == 2 and "is already completed: nothing to resume" in again.stderr


def test_resuming_after_a_clean_stop_removes_an_empty_staging_folder_without_a_warning(tmp_path, monkeypatch):
    import warnings

    from recipes_broken import GOOD, make_workspace
    from recipes_broken import write as write_yaml

    from finetune.recipe.load import load_recipe
    from finetune.runs import Manifest, RunDir
    from finetune.runs import write_recipe as save_recipe
    from finetune.train import _claim

    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(write_yaml(tmp_path, "recipe.yaml", GOOD))
    run = RunDir(recipe.run_dir)
    checkpoint = run.checkpoints / "checkpoint-4"
    for partial in (False, True):
        (run.checkpoints / ".staging").mkdir(parents=True, exist_ok=True)
        if partial:
            (run.checkpoints / ".staging" / "checkpoint-5").mkdir()
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        save_recipe(run, recipe)
        Manifest.start(run, recipe).update(status="interrupted")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _claim(run, recipe, checkpoint, replace=False, resume=True)
        said = [str(w.message) for w in caught if "partial checkpoint" in str(w.message)]
        assert len(said) == int(partial), said
        assert not (run.checkpoints / ".staging").exists()


def test_checkpoint_rotation_renames_before_deleting_so_a_kill_never_leaves_half_a_checkpoint(tmp_path):
    from finetune.trainer import rotate

    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
            (checkpoints / f"checkpoint-{step}" / name).write_text(name)
    code = f"""
import os, shutil, signal
from pathlib import Path
from finetune.trainer import rotate
real = shutil.rmtree
def killed_midway(path, *args, **kwargs):  # the kill lands while the old checkpoint's files are being deleted
    next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
    os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = killed_midway
rotate(Path({str(checkpoints)!r}), 2)
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    visible = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
    assert visible == ["checkpoint-2", "checkpoint-3"]  # checkpoint-1 is gone whole, not left without its weights
    assert all(len(list((checkpoints / n).iterdir())) == 3 for n in visible)
    rotate(checkpoints, 2)  # the next save cleans the remains of the killed rotation
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]
