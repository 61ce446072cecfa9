"""Training in a subprocess: start `finetune train`, wait for a step, read the adapter; shared by the reliability, distributed and preference tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def start(recipe: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "train", str(recipe), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists():
            lines = (run / "metrics.jsonl").read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(step)
