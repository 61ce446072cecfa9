"""The shipped sharding configs, launched for real on two CPU processes (gloo): the adapter matches one process.

`configs/accelerate/fsdp.yaml`: accelerate applies FSDP only on an accelerator, so on a CPU-only machine
it runs plain data parallel; the manifest and a warning say so. `deepspeed-zero2.yaml`: DeepSpeed's
CPU accelerator runs ZeRO-2 (with deepspeed from `scripts/setup_engines.sh deepspeed`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import finetune, losses
from services import ROOT, free_port
from shared_distributed import no_dropout_recipe
from training import adapter_tensors

pytestmark = pytest.mark.engines

DEEPSPEED = Path(os.environ.get("FINETUNE_DEEPSPEED_PATH") or ROOT / ".engines" / "deepspeed")


def launch(config: str, recipe: Path, out: str, pythonpath: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
               "--num_processes", "2", "--main_process_port", str(free_port()),
               "-m", "finetune.cli", "train", str(recipe), "--set", f"output_dir=runs/{out}", "--set", "train.batch_size=4"]  # fmt: skip
    return subprocess.run(command, cwd=recipe.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> Path:
    """One process, global batch 8: the reference."""
    tmp = tmp_path_factory.mktemp("sharded")
    recipe = no_dropout_recipe(tmp, tiny_model_dir(), batch=8)
    result = finetune("train", str(recipe), "--set", "output_dir=runs/one", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe


def same_training(one: Path, two: Path) -> None:
    assert losses(two) == pytest.approx(losses(one), abs=2e-4)
    expected, got = adapter_tensors(one), adapter_tensors(two)
    assert set(expected) == set(got)
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-4, name
    manifest = json.loads((two / "manifest.json").read_text())
    assert (manifest["processes"], manifest["global_batch"], manifest["status"]) == (2, 8, "completed")


def test_the_shipped_fsdp_config_on_two_cpu_processes_matches_one_and_says_it_did_not_shard(single):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine shards for real: the GPU check (scripts/gpu_check.py) covers it")
    result = launch("fsdp.yaml", single, "fsdp", [])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = single.parent / "runs"
    same_training(runs / "one", runs / "fsdp")
    manifest = json.loads((runs / "fsdp" / "manifest.json").read_text())
    assert manifest["distributed"] == {"requested": "FSDP", "ran": "MULTI_CPU"}
    assert "the launch asked for FSDP, but accelerate runs MULTI_CPU here" in result.stderr


def test_the_shipped_deepspeed_zero2_config_on_two_cpu_processes_matches_one(single):
    if not (DEEPSPEED / "deepspeed").is_dir():
        pytest.skip(f"deepspeed is not installed in {DEEPSPEED}: run `bash scripts/setup_engines.sh deepspeed`")
    result = launch("deepspeed-zero2.yaml", single, "zero2", [str(DEEPSPEED)])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = single.parent / "runs"
    same_training(runs / "one", runs / "zero2")
    manifest = json.loads((runs / "zero2" / "manifest.json").read_text())
    assert manifest["distributed"] == {"requested": "DEEPSPEED", "ran": "DEEPSPEED"}
