"""The engine stage's fixtures: one short quickstart run, trained once, that the real engines must reproduce.

Run with `python -m pytest -q -p no:cacheprovider -m engines tests/engines` after
`bash scripts/setup_engines.sh` (the main suite deselects these: pyproject's addopts).
FINETUNE_ENGINE_RUN=DIR reuses a finished quickstart-like run instead of training one.

A test whose engine is absent skips with the reason, so that a developer without the engines is not
blocked. CI must never pass on skips: FINETUNE_ENGINES_REQUIRED=1 (.ci/run sets it) turns every skip here
into a failure that still names the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVAL_ROWS = 10
REQUIRED_ENV = "FINETUNE_ENGINES_REQUIRED"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under FINETUNE_ENGINES_REQUIRED=1, a skipped engine test is a failure: an absent engine proves nothing."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(REQUIRED_ENV) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"{REQUIRED_ENV}=1 and this engine test skipped: {reason}"


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The quickstart recipe, 40 steps, eval (tuned and base) on the first held-out rows."""
    reuse = os.environ.get("FINETUNE_ENGINE_RUN")
    if reuse:
        return Path(reuse).resolve()
    from finetune.recipe.load import load_recipe
    from finetune.train import train

    out = tmp_path_factory.mktemp("engines") / "quickstart"
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                         [f"output_dir={out}", "train.max_steps=40", f"data.eval.0.limit={EVAL_ROWS}"])  # fmt: skip
    return Path(train(recipe, progress=False).run_dir)
