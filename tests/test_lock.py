"""One `finetune train` per run directory: a second is refused naming the first; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune.errors import RunDirError
from finetune.lock import RunLock, lock_path

HOLD = textwrap.dedent(
    """
    import sys, time
    from finetune.lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/runs/demo, as a live `finetune train` would."""
    run = tmp_path / "runs" / "demo"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_holder_is_refused_with_the_first_ones_pid_host_and_start(holder):
    run, proc = holder
    with pytest.raises(RunDirError) as e:
        RunLock(run).acquire()
    message = str(e.value)
    assert f"pid {proc.pid} on " in message and ", started 20" in message and str(run) in message


def test_a_lock_left_by_a_killed_process_is_taken_over_and_its_holder_named(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(run) as lock:
        assert lock.stale is not None and lock.stale["pid"] == proc.pid
        assert f'"pid": {os.getpid()}' in lock_path(run).read_text()
    assert lock_path(run).read_text() == ""  # released: an empty record, never a stale one
    with RunLock(run) as again:
        assert again.stale is None


def test_the_lock_file_lives_beside_the_run_directory_so_overwrite_cannot_delete_it(tmp_path):
    assert lock_path(tmp_path / "runs" / "demo") == tmp_path / "runs" / ".demo.lock"
    assert lock_path(Path("runs/demo/")) == Path.cwd() / "runs" / ".demo.lock"


def write_recipe(root: Path) -> Path:
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    for name in ("model.safetensors", "tokenizer.json"):  # what `train`'s preflight asks of a model directory
        (root / "model" / name).write_text("")
    (root / "model" / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}\n')
    (root / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    recipe = root / "recipe.yaml"
    recipe.write_text("name: demo\nmodel: {base: ./model}\ndata:\n  train: [{path: train.jsonl}]\n")
    return recipe


def in_use(run: Path) -> None:
    run.mkdir(parents=True)
    (run / "manifest.json").write_text('{"status": "running"}')
    (run / "recipe.yaml").write_text("name: demo\n")


def test_finetune_train_overwrite_on_a_directory_in_use_exits_2_and_touches_nothing(holder, tmp_path):
    run, proc = holder
    in_use(run)
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "train", str(write_recipe(tmp_path)), "--overwrite"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"is in use by another finetune train (pid {proc.pid} on" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run / "manifest.json").read_text() == '{"status": "running"}'  # not overwritten, not marked failed


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}], ids=["plain", "resume", "overwrite"])
def test_train_on_a_directory_in_use_is_refused_before_reading_or_writing_it(holder, tmp_path, monkeypatch, flags):
    from finetune.recipe.load import load_recipe
    from finetune.train import train

    run, proc = holder
    in_use(run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match=rf"in use by another finetune train \(pid {proc.pid} on .*, started "):
        train(load_recipe(write_recipe(tmp_path)), **flags)
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "recipe.yaml"]
    assert (run / "manifest.json").read_text() == '{"status": "running"}'


def test_train_holds_the_lock_for_the_whole_run(tmp_path, monkeypatch):
    """While the stage runs, another process cannot take the lock; after it, it can."""
    from finetune import train as train_module
    from finetune.recipe.load import load_recipe

    monkeypatch.chdir(tmp_path)  # run_dir (runs/demo) is relative to the working directory
    recipe = load_recipe(write_recipe(tmp_path))
    probe = "import sys; from finetune.lock import RunLock; RunLock(sys.argv[1]).acquire()"
    seen = {}

    def fake_run(recipe, overwrite, resume, progress, on_eval):
        seen["during"] = subprocess.run([sys.executable, "-c", probe, recipe.run_dir], capture_output=True, text=True)
        return "result"

    monkeypatch.setattr(train_module, "_train_run", fake_run)
    assert train_module.train(recipe) == "result"
    assert seen["during"].returncode != 0 and f"pid {os.getpid()}" in seen["during"].stderr
    after = subprocess.run([sys.executable, "-c", probe, recipe.run_dir], capture_output=True, text=True)
    assert after.returncode == 0, after.stderr
