"""Runs for the chat and serve tests, trained once per session on the shipped quickstart model.

- quickstart: the quickstart recipe, a few steps, eval on the first held-out rows (eval/examples.jsonl
  holds the tuned and base predictions that chat and serve must reproduce);
- say-yes / say-no: two adapters on the same base taught to answer every prompt with one word each
  ("yes", "no"), so an answer shows which adapter produced it;
- other-base: an adapter trained on a different (tiny random) base, which the server must refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tiny

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
EVAL_ROWS = 6


@dataclass
class ServingRuns:
    quickstart: Path
    yes: Path
    no: Path
    other_base: Path

    def examples(self) -> list[dict]:
        """eval/examples.jsonl of the quickstart run, with the user message of each held-out row."""
        rows = [json.loads(line) for line in (self.quickstart / "eval" / "examples.jsonl").read_text().splitlines()]
        data = (ROOT / "assets" / "quickstart" / "data" / "eval.jsonl").read_text().splitlines()
        for row, line in zip(rows, data, strict=False):
            row["user"] = json.loads(line)["messages"][0]["content"]
        return rows


def _train(recipe: Path, overrides: list[str]) -> Path:
    from finetune.recipe.load import load_recipe
    from finetune.train import train

    return Path(train(load_recipe(recipe, overrides), progress=False).run_dir)


def _one_word_run(root: Path, word: str) -> Path:
    """The quickstart recipe on rows whose answer is always `word`."""
    prompts = [json.loads(line)["messages"][0]["content"] for line in
               (ROOT / "assets" / "quickstart" / "data" / "train.jsonl").read_text().splitlines()[:64]]  # fmt: skip
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": word}]} for p in prompts]
    data = tiny.write_jsonl(root / f"{word}.jsonl", rows)
    return _train(QUICKSTART, [f"name=say-{word}", f"output_dir={root / f'say-{word}'}", f"data.train=[{{path: {data}}}]",
                               "data.eval=null", "train.max_steps=16", "train.lr=1.0e-2"])  # fmt: skip


def build(root: Path, other_model: Path) -> ServingRuns:
    quickstart = _train(QUICKSTART, [f"output_dir={root / 'quickstart'}", "train.max_steps=40",
                                     f"data.eval.0.limit={EVAL_ROWS}"])  # fmt: skip
    rows = tiny.write_jsonl(root / "other.jsonl", tiny.reverse_rows(16))
    body = (f"name: other-base\nmodel: {{base: {other_model}}}\nlora: {{rank: 8, alpha: 16}}\n"
            f"data: {{train: [{{path: {rows}}}], max_seq_length: 64}}\n"
            "train: {max_steps: 2, batch_size: 8, gradient_checkpointing: false}\n"
            f"output_dir: {root / 'other-base'}\n")  # fmt: skip
    (root / "other.yaml").write_text(body)
    other = _train(root / "other.yaml", [])
    return ServingRuns(quickstart, _one_word_run(root, "yes"), _one_word_run(root, "no"), other)
