"""CI's engine stage cannot pass by skipping: FINETUNE_ENGINES_REQUIRED=1 turns an absent engine into a failure,
and the one setup script refuses an unknown step. (The engines themselves run in tests/engines.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_TEST = "tests/engines/test_vllm.py::test_a_wrong_key_is_refused"


def _engine_test(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "FINETUNE_VLLM_PYTHON": str(tmp_path / "no-vllm" / "python"), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "engines", ENGINE_TEST],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_an_absent_engine_fails_in_ci(tmp_path):  # without the variable it skips: pytest's own behaviour
    ci = _engine_test(tmp_path, FINETUNE_ENGINES_REQUIRED="1")
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "FINETUNE_ENGINES_REQUIRED=1 and this engine test skipped: vLLM not installed" in ci.stdout
    assert "1 error" in ci.stdout  # the skip came from a fixture: a setup error, which fails the run as well


def test_the_setup_script_refuses_an_unknown_step():
    done = subprocess.run(["bash", "scripts/setup_engines.sh", "everything"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "FINETUNE_ENGINES": "/nonexistent-unused"})  # fmt: skip
    assert done.returncode == 2
    assert "usage: bash scripts/setup_engines.sh [services|postgres|mlflow|deepspeed|vllm|llama|all]" in done.stderr


def test_ci_runs_the_setup_then_every_engine_test_required():
    ci = (ROOT / ".ci" / "run").read_text()
    setup = ci.index("bash scripts/setup_engines.sh all")
    tests = ci.index("FINETUNE_ENGINES_REQUIRED=1 python -m pytest -q -p no:cacheprovider -m engines tests/engines")
    assert setup < tests
    assert '"$rc" = 5' in ci  # no test collected is a failure too
    assert not (ROOT / "scripts" / "setup_services.sh").exists()
