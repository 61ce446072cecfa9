"""Two processes on the CPU (gloo): the same curve as one process with the same global batch, one run
directory, a two-"node" launch on localhost, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import finetune, losses, write_recipe
from shared_distributed import no_dropout_recipe
from training import adapter_tensors, wait_for_step

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
            "-m", "finetune.cli", "train", *args]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    single = no_dropout_recipe(tmp_path, tiny_model_dir(), batch=8)
    assert finetune("train", str(single), "--set", "output_dir=runs/one", cwd=tmp_path).returncode == 0
    double = no_dropout_recipe(tmp_path, tiny_model_dir(), batch=4)
    port = free_port()
    result = subprocess.run(torchrun(str(double), "--set", "output_dir=runs/two", extra=(f"--master_port={port}",)),
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    assert losses(two) == pytest.approx(losses(one), abs=2e-4)
    manifest = json.loads((two / "manifest.json").read_text())
    assert (manifest["processes"], manifest["global_batch"], manifest["status"]) == (2, 8, "completed")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.suffix != ".lock") == ["one", "two"]
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 9))  # written once, by the main process
    assert result.stdout.count("held-out (") == 1, "only the main process reports"


def test_two_nodes_on_localhost(tiny_model_dir, tmp_path):
    recipe = no_dropout_recipe(tmp_path, tiny_model_dir(), batch=4)
    port = free_port()
    nodes = [
        subprocess.Popen(
            torchrun(
                str(recipe),
                nproc=1,
                extra=("--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"),
            ),
            cwd=tmp_path,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["status"] == "completed"


def test_resume_after_a_kill_with_two_processes(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir())
    text = (
        recipe.read_text()
        .replace("max_steps: 8", "max_steps: 24\n  save_every: 4")
        .replace("batch_size: 8", "batch_size: 4")
    )
    recipe.write_text(text.replace("lora: {rank: 8, alpha: 16}", "lora: {rank: 8, alpha: 16, dropout: 0.1}"))

    def launch(out: str, *more: str) -> subprocess.Popen:
        return subprocess.Popen(torchrun(str(recipe), "--set", f"output_dir=runs/{out}", *more,
                                         extra=(f"--master_port={free_port()}",)),
                                cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip

    full = launch("full")
    assert full.wait(timeout=300) == 0, full.communicate()[1][-2000:]
    killed = launch("killed")
    wait_for_step(tmp_path / "runs" / "killed", 10, killed)
    import psutil

    launcher = psutil.Process(killed.pid)
    for proc in [*launcher.children(recursive=True), launcher]:  # workers may sit in their own sessions
        proc.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = launch("killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    manifest = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())
    resumed_from = manifest["resumes"][0]["from_step"]
    assert manifest["status"] == "completed" and 8 <= resumed_from < 24 and resumed_from % 4 == 0
    expected, got = adapter_tensors(tmp_path / "runs" / "full"), adapter_tensors(tmp_path / "runs" / "killed")
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, name


def test_train_distributed_relaunches_under_accelerate_once(tiny_model_dir, tmp_path):
    """`train.distributed` names an accelerate config: finetune launches itself on it (and not again)."""
    config = tmp_path / "single.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n")
    recipe = write_recipe(tmp_path, tiny_model_dir())
    result = finetune(
        "train", str(recipe), "--set", f"train.distributed={config}", "--set", "train.max_steps=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("launching: -m accelerate.commands.launch --config_file") == 1
    assert json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["status"] == "completed"
    failing = finetune("train", str(recipe), "--set", f"train.distributed={config}", cwd=tmp_path)
    assert failing.returncode == 2 and "already exists" in failing.stderr and "launching" not in failing.stderr
