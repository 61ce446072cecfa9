"""What the engine tests compare against: eval's answers of the run, and the check that they mean something."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def examples(run: Path) -> list[dict]:
    """eval/examples.jsonl with the user message of each held-out row (the prompt a chat client sends)."""
    rows = [json.loads(line) for line in (run / "eval" / "examples.jsonl").read_text().splitlines()]
    data = (ROOT / "assets" / "quickstart" / "data" / "eval.jsonl").read_text().splitlines()
    for row, line in zip(rows, data, strict=False):
        row["user"] = json.loads(line)["messages"][0]["content"]
    return rows


def meaningful(rows: list[dict]) -> None:
    """The run must answer differently from its base, or agreement with eval proves nothing about the adapter."""
    differ = sum(r["tuned"] != r["base"] for r in rows)
    assert differ >= len(rows) // 2, f"the tuned model answers like the base on {len(rows) - differ}/{len(rows)}"
