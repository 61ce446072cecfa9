"""The SFT parent run and recipe files of the preference tests, shared with the GRPO tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiny

from finetune.recipe.load import load_recipe

_BUILT: dict[str, Path] = {}


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Reverse three words: the reversed order chosen, the original order rejected."""
    out = []
    for row in tiny.reverse_rows(n, seed):
        user, answer = row["messages"]
        out.append({"prompt": user["content"], "chosen": answer["content"], "rejected": user["content"][9:]})
    return out


def write(root: Path, name: str, body: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.yaml").write_text(body)
    return root / f"{name}.yaml"


def sft_recipe(root: Path, model_dir: Path) -> Path:
    tiny.write_jsonl(root / "data" / "sft.jsonl", tiny.reverse_rows(32))
    return write(root, "sft", f"""\
name: sft
model: {{base: {model_dir}}}
lora: {{rank: 8, alpha: 16}}
data: {{train: [{{path: data/sft.jsonl}}], max_seq_length: 64}}
train: {{max_steps: 6, lr: 5.0e-3, batch_size: 8, warmup_ratio: 0.0, gradient_checkpointing: false}}
output_dir: runs/sft
""")  # fmt: skip


def dpo_recipe(root: Path, parent: Path, extra: str = "", name: str = "dpo") -> Path:
    tiny.write_jsonl(root / "data" / "pairs.jsonl", pairs(40))
    tiny.write_jsonl(root / "data" / "held.jsonl", pairs(8, seed=1))
    return write(root, name, f"""\
name: {name}
model: {{from_run: {parent}}}
data:
  train: [{{path: data/pairs.jsonl, format: preference}}]
  eval: [{{path: data/held.jsonl, format: preference}}]
  max_seq_length: 64
train:
  method: dpo
  max_steps: 8
  lr: 5.0e-3
  batch_size: 4
  warmup_ratio: 0.0
  gradient_checkpointing: false
  logging_every: 1
  save_every: 4
eval: {{metrics: [exact_match], max_new_tokens: 6}}
output_dir: {root / "runs" / name}
{extra}""")  # fmt: skip


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_model_dir) -> Path:
    """A completed tiny SFT run, trained once for the module."""
    from finetune.train import train

    if "parent" not in _BUILT:
        root = tmp_path_factory.mktemp("sft")
        cwd = os.getcwd()
        os.chdir(root)
        try:
            result = train(load_recipe(sft_recipe(root, tiny_model_dir("llama"))), progress=False)
        finally:
            os.chdir(cwd)
        _BUILT["parent"] = Path(result.run_dir).resolve()
    return _BUILT["parent"]


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, parent):
    """(run directory, trained PeftModel) of a DPO run continuing `parent`, trained once for the module."""
    from finetune.train import train

    if "dpo" not in _BUILT:
        root = tmp_path_factory.mktemp("dpo")
        result = train(load_recipe(dpo_recipe(root, parent)), progress=False)
        _BUILT["dpo"] = (Path(result.run_dir), result.model, root)
    return _BUILT["dpo"]
