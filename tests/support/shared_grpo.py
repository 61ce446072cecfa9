"""Shared by test_grpo and the tests that import from it."""

from __future__ import annotations

from pathlib import Path

import tiny
from preference_runs import write

REWARDS = '''\
import os
import signal

calls = 0


def first_word(prediction, reference):
    """1 when the answer starts with the reference's first item."""
    return float(prediction.strip().split(",")[0].strip() == reference.split(",")[0].strip())


def close_length(prediction, reference):
    """Partial credit for an answer about as long as the reference."""
    global calls
    calls += 1
    if os.environ.get("REWARD_SIGTERM_AT") and calls == int(os.environ["REWARD_SIGTERM_AT"]):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption, arriving mid-step
    if os.environ.get("REWARD_FAIL_AT") and calls >= int(os.environ["REWARD_FAIL_AT"]):
        fail_as = os.environ["REWARD_FAIL_AS"]
        return float("nan") if fail_as == "nan" else "long" if fail_as == "text" else 1 / 0
    return max(0.0, 1 - abs(len(prediction) - len(reference)) / 20)
'''


def grpo_recipe(root: Path, parent_run: Path, name: str = "grpo", extra: str = "") -> Path:
    tiny.write_jsonl(root / "data" / "prompts.jsonl", tiny.reverse_rows(32))
    tiny.write_jsonl(root / "data" / "held.jsonl", tiny.reverse_rows(6, seed=1))
    (root / "myrewards.py").write_text(REWARDS)
    return write(root, name, f"""\
name: {name}
model: {{from_run: {parent_run}}}
data:
  train: [{{path: data/prompts.jsonl}}]
  eval: [{{path: data/held.jsonl}}]
  max_seq_length: 64
train:
  method: grpo
  grpo:
    rewards: [myrewards:first_word, myrewards:close_length]
    reward_weights: [1.0, 0.5]
    num_generations: 4
    max_completion_length: 8
    beta: 0.04
  max_steps: 6
  lr: 5.0e-3
  batch_size: 8
  warmup_ratio: 0.0
  logging_every: 1
  save_every: 3
eval: {{metrics: [exact_match], max_new_tokens: 8, batch_size: 6}}
output_dir: {root / "runs" / name}
{extra}""")  # fmt: skip
