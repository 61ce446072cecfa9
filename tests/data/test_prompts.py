"""GRPO's prompts: the text eval gives the model, the reference kept beside it, and prompts that do not fit dropped.

No training: the rows are prepared with the tiny tokenizer and checked against what `eval` would render.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny

from finetune.data.prompts import prepare_prompts
from finetune.data.templates import encode, prompt_and_reference
from finetune.errors import DataError
from finetune.recipe.load import load_recipe

REWARDS = "def length(prediction, reference):\n    return float(len(prediction))\n"


def recipe(root: Path, model_dir: Path, rows: list[dict], extra: str = "", max_seq_length: int = 64):
    tiny.write_jsonl(root / "data" / "prompts.jsonl", rows)
    (root / "rewards.py").write_text(REWARDS)
    (root / "r.yaml").write_text(f"""\
name: g
model: {{base: {model_dir}}}
data:
  train: [{{path: {root}/data/prompts.jsonl}}]
  max_seq_length: {max_seq_length}
{extra}
train:
  method: grpo
  grpo: {{rewards: ["{root}/rewards.py:length"], num_generations: 2, max_completion_length: 8}}
  batch_size: 2
""")  # fmt: skip
    return load_recipe(root / "r.yaml")


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_each_prompt_is_what_eval_renders_and_the_answer_is_kept_as_reference(tmp_path, tiny_tokenizer_dir, tokenizer):
    rows = tiny.reverse_rows(6)
    data = prepare_prompts(recipe(tmp_path, tiny_tokenizer_dir, rows), tokenizer)
    assert data.eval is None and data.eval_samples == []
    for row, prepared in zip(rows, data.train, strict=True):
        user, answer = row["messages"]
        assert prepared["prompt"] == f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n"
        assert prepared["reference"] == answer["content"]
    assert [r["where"] for r in data.train] == [f"{tmp_path}/data/prompts.jsonl:{i}" for i in range(1, 7)]
    longest = max(len(encode(tokenizer, r["prompt"])) for r in data.train)
    assert data.stats.max_seq_length == longest + 8, "the longest prompt plus max_completion_length"
    assert data.stats.prompt_lengths["max"] == longest and data.stats.train_rows == 6


def test_a_prompt_without_room_for_the_completion_is_dropped_never_cut(tmp_path, tiny_tokenizer_dir, tokenizer):
    rows = tiny.reverse_rows(4)
    long = {"messages": [{"role": "user", "content": "Reverse: " + " ".join(tiny.WORDS)},
                         {"role": "assistant", "content": "x"}]}  # fmt: skip
    short_tokens = max(len(encode(tokenizer, prompt_and_reference(tokenizer, _sample(r))[0])) for r in rows)
    r = recipe(tmp_path, tiny_tokenizer_dir, [*rows, long], max_seq_length=short_tokens + 8)
    data = prepare_prompts(r, tokenizer)
    assert data.stats.dropped == 1 and data.stats.truncated == 0 and data.stats.train_rows == 4
    assert not data.train["where"][-1].endswith(":5"), "the long prompt (row 5) is not in, in part or whole"
    assert all(p.endswith("<|im_start|>assistant\n") for p in data.train["prompt"]), "every kept prompt is whole"
    assert data.stats.suggested_max_seq_length >= data.stats.max_seq_length


def test_nothing_left_to_prompt_says_why(tmp_path, tiny_tokenizer_dir, tokenizer):
    r = recipe(tmp_path, tiny_tokenizer_dir, tiny.reverse_rows(3), max_seq_length=10)
    with pytest.raises(
        DataError,
        match=r"no training prompts left: 3 longer than data\.max_seq_length \(10\) minus train\.grpo\.max_completion_length \(8\) allows",
    ):
        prepare_prompts(r, tokenizer)


def test_held_out_prompts_are_split_by_the_seed_and_a_repeated_prompt_is_counted(
    tmp_path, tiny_tokenizer_dir, tokenizer
):
    rows = tiny.reverse_rows(10)
    r = recipe(tmp_path, tiny_tokenizer_dir, [*rows, rows[0], rows[0]], extra="  eval: {split_ratio: 0.25}")
    first = prepare_prompts(r, tokenizer)
    again = prepare_prompts(r, tokenizer)
    assert first.stats.train_rows + first.stats.eval_rows == 12 and first.stats.eval_rows == 3
    assert list(first.eval["prompt"]) == list(again.eval["prompt"]), "the same seed holds out the same prompts"
    assert [s.where for s in first.eval_samples] == list(first.eval["where"])
    held = set(first.eval["prompt"])
    assert first.stats.duplicates_train_eval == sum(p in held for p in first.train["prompt"])


def _sample(row: dict):
    from finetune.data.formats import Sample

    return Sample("x", messages=tuple((t["role"], t["content"]) for t in row["messages"]))


def test_examples_show_the_first_prompts_as_text(tmp_path, tiny_tokenizer_dir, tokenizer):
    data = prepare_prompts(recipe(tmp_path, tiny_tokenizer_dir, tiny.reverse_rows(3)), tokenizer)
    assert [e["prompt"] for e in data.examples] == list(data.train["prompt"])
    assert json.dumps(data.stats.to_dict())  # the manifest's `data` is plain JSON
