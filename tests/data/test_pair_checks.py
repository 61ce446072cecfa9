"""Data checks on preference (DPO, KTO) and GRPO data, through the preparation each method runs."""

from __future__ import annotations

import json

import pytest

from finetune.data.preference import prepare_preference
from finetune.data.prompts import prepare_prompts
from finetune.errors import DataError
from finetune.modeling import load_tokenizer
from finetune.recipe.load import load_recipe


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(method, train, fmt, *extra):
    sets = [f"train.method={method}", f"data.train=[{{path: {train}, format: {fmt}}}]", "data.eval=null", *extra]
    return load_recipe("recipes/quickstart.yaml", sets)


def _found(stats):
    return {f["kind"]: f for f in stats.checks["findings"]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe("recipes/quickstart.yaml", []))


def test_dpo_reversed_and_identical_pairs_are_found(tmp_path, tokenizer):
    train = _write(tmp_path / "p.jsonl", [
        {"prompt": "a b", "chosen": "x", "rejected": "y"},
        {"prompt": "a  b", "chosen": "y", "rejected": "x"},  # the same prompt, the reverse verdict
        {"prompt": "c d", "chosen": "x  y", "rejected": "x y"},  # equal once whitespace is normalised
        {"prompt": "e f", "chosen": "<|im_end|> p", "rejected": "q"},
        {"prompt": "g h", "chosen": "r", "rejected": "s"},
        {"prompt": "g h", "chosen": "r", "rejected": "s"},
    ])  # fmt: skip
    found = _found(prepare_preference(_recipe("dpo", train, "preference"), tokenizer).stats)
    assert found["contradictions"]["examples"] == [f"{train}:1 vs {train}:2"]
    assert found["identical_pairs"]["examples"] == [f"{train}:3"]
    assert found["template_tokens"]["examples"] == [f"{train}:4"]
    assert found["duplicates"]["examples"] == [f"{train}:6 = {train}:5"]
    data = prepare_preference(_recipe("dpo", train, "preference", "data.dedup=exact"), tokenizer)
    assert data.stats.train_rows == 5 and data.stats.checks["dropped"] == {"duplicates": 1}


def test_kto_label_balance_and_contradicting_labels(tmp_path, tokenizer):
    rows = [{"prompt": "a b", "completion": "x", "label": True}, {"prompt": "a b", "completion": "x", "label": False}]
    rows += [{"prompt": f"q{i}", "completion": f"z{i}", "label": False} for i in range(4)]
    train = _write(tmp_path / "k.jsonl", rows)
    found = _found(prepare_preference(_recipe("kto", train, "unpaired"), tokenizer).stats)
    assert found["contradictions"]["examples"] == [f"{train}:1 vs {train}:2"]
    assert "1 desirable / 5 undesirable" in found["label_balance"]["detail"]
    assert "desirable_weight 5.00 would make it 1" in found["label_balance"]["detail"]
    weighted = prepare_preference(_recipe("kto", train, "unpaired", "train.kto.desirable_weight=5.0"), tokenizer)
    assert "label_balance" not in _found(weighted.stats)


def test_preference_leakage_stops_on_error_and_grpo_prompts_are_checked(tmp_path, tokenizer):
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": f"p{i} w", "chosen": "x", "rejected": "y"} for i in range(4)])
    held = _write(tmp_path / "e.jsonl", [{"prompt": "p1 w", "chosen": "z", "rejected": "y"}])
    recipe = _recipe(
        "dpo",
        pairs,
        "preference",
        f"data.eval=[{{path: {held}, format: preference}}]",
        "data.leakage=error",
        "eval.slice_by=null",
    )  # fmt: skip  (the held-out rows have no slice column)
    with pytest.raises(DataError, match=rf"leakage.*{held}:1 = {pairs}:2"):
        prepare_preference(recipe, tokenizer)
    chats = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
             for u, a in (("one two", "a"), ("one two", "b"), ("three", "c"))]  # fmt: skip
    train = _write(tmp_path / "g.jsonl", chats)
    grpo = _recipe("grpo", train, "messages", "train.grpo.rewards=[exact_match]", "train.grpo.max_completion_length=8")
    found = _found(prepare_prompts(grpo, tokenizer).stats)
    assert found["contradictions"]["examples"] == [f"{train}:1 vs {train}:2"]  # one prompt, two references
    assert "truncation" not in found and "length_outliers" not in found
