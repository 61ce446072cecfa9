"""Sweeps on PostgreSQL for real: a throwaway server, two `finetune sweep --worker` processes, one killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import write_recipe
from services import start_postgres

pytestmark = pytest.mark.engines

SWEEP = """\
recipe: recipe.yaml
fixed: {train.max_steps: 8, train.save_every: 2, eval.compare_base: false}
grid:
  lora.rank: [2, 8]
"""


def sweep(path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", "sweep", str(path), *args], cwd=path.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def manifests(sweep_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sweep_dir.glob("*/manifest.json"):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except ValueError:  # never half-written (atomic), but a reader may race a rename on some filesystems
            continue
    return out


def test_two_workers_share_a_study_on_postgres_and_a_killed_workers_trial_is_resumed(tiny_model_dir, tmp_path):
    write_recipe(tmp_path, tiny_model_dir())
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(SWEEP))
    sweep_dir = tmp_path / "runs" / "sweep"
    with start_postgres() as url:
        workers = {}
        for _ in range(2):
            proc = sweep(path, "--storage", url, "--worker")
            workers[proc.pid] = proc
        try:
            victim = _wait_for_both_trials_then_a_checkpoint(workers, sweep_dir)
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            [survivor] = [p for pid, p in workers.items() if pid != victim]
            _, err = survivor.communicate(timeout=400)
            assert survivor.returncode == 0, err[-3000:]
        finally:
            for proc in workers.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        killed = {n for n, m in manifests(sweep_dir).items() if m["process"]["pid"] == victim}
        [killed_run] = killed
        assert manifests(sweep_dir)[killed_run]["status"] == "running"  # the worker left it alone: maybe another's

        rerun = sweep(path, "--storage", url)  # the study's owner continues what a kill left RUNNING
        _, err = rerun.communicate(timeout=400)
        assert rerun.returncode == 0, err[-3000:]
        assert "continuing trial" in err and killed_run in err

        import optuna

        study = optuna.load_study(study_name="sweep", storage=url)
        states = sorted((t.user_attrs["name"], t.state.name) for t in study.get_trials())
        assert states == [("rank-2", "COMPLETE"), ("rank-8", "COMPLETE")]  # each trial once, both complete
    runs = manifests(sweep_dir)
    assert set(runs) == {"rank-2", "rank-8"} and all(m["status"] == "completed" for m in runs.values())
    assert runs[killed_run]["resumes"][0]["from_step"] >= 2  # resumed from its checkpoint, not started over
    [other] = set(runs) - {killed_run}
    assert "resumes" not in runs[other]
    listed = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    assert sorted((t["name"], t["status"]) for t in listed) == [("rank-2", "completed"), ("rank-8", "completed")]


def _wait_for_both_trials_then_a_checkpoint(workers: dict[int, subprocess.Popen], sweep_dir: Path) -> int:
    """Both workers train a trial of their own; returns the pid of one whose trial has a checkpoint."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = manifests(sweep_dir)
        pids = {m["process"]["pid"] for m in runs.values()}
        saved = [m["process"]["pid"] for n, m in runs.items()
                 if m["status"] == "running" and any((sweep_dir / n / "checkpoints").glob("checkpoint-*"))]  # fmt: skip
        if pids == set(workers) and saved:
            return saved[0]
        for proc in workers.values():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    pytest.fail(f"the two workers did not both start a trial within 300 s: {sorted(manifests(sweep_dir))}")
