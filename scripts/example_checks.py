"""What the end-to-end checks of the shipped examples (check_quickstart_dpo.py, check_quickstart_grpo.py) share:
running `finetune` as a user does, and the common tail of every check (eval agrees and gates, merge verifies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def workdir(given: Path | None, prefix: str) -> Path:
    """The directory the check's runs go in: the one given, or a new temporary one."""
    work = (given or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return work


def completed(work: Path, run: str) -> bool:
    """Whether WORK/runs/RUN finished, so that a rerun may reuse it as the parent."""
    manifest = work / "runs" / run / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["status"] == "completed"


def finetune(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run `finetune ARGS` in `cwd`; exit naming the command on failure (a failed `eval` gate, exit 1, returns)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0 and not (done.returncode == 1 and args[0] == "eval"):
        sys.exit(f"finetune {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done, time.perf_counter() - started


def eval_and_merge(run: Path, work: Path, require: str) -> list[str]:
    """`finetune eval RUN --require` must reproduce training's held-out figures and pass; `merge` must verify."""
    misses = []
    evaluated, _ = finetune("eval", str(run), "--json", "--require", require, cwd=work)
    again = json.loads(evaluated.stdout)
    if again["tuned"]["metrics"] != json.loads((run / "eval" / "summary.json").read_text())["tuned"]["metrics"]:
        misses.append("finetune eval disagrees with the end-of-training evaluation")
    if again["gate_failures"]:
        misses.append(f"finetune eval gate: {again['gate_failures']}")
    merged, _ = finetune("merge", str(run), "--json", cwd=work)
    check = json.loads(merged.stdout)["check"]
    print(f"merge: passed {check['passed']}, max |logit diff| {check['max_abs_diff']:.2e}")
    if not check["passed"]:
        misses.append("the merged model failed its logits check")
    return misses
