"""The engine stage's fixtures: one short quickstart run, trained once, that the real engines must reproduce.

Run with `python -m pytest -q -p no:cacheprovider -m engines tests/engines` after
`bash scripts/setup_engines.sh` (the main suite deselects these: pyproject's addopts).
FINETUNE_ENGINE_RUN=DIR reuses a finished quickstart-like run instead of training one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVAL_ROWS = 10


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
