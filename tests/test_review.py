"""`finetune review` on a git repository built here: which recipes a commit touches, and how."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import tiny
from helpers import finetune

from finetune.loading import load_recipe
from finetune.plan import plan
from finetune.review import gate, markdown, review

FRAGMENT = """\
lora:
  alpha: 16
  targets: [q_proj, v_proj]
train:
  max_steps: 4
  batch_size: 4
  gradient_checkpointing: false
"""


def _recipe(name: str, model: Path, data: str = "../data/train.jsonl", rank: int = 8, extends: bool = True) -> str:
    head = "extends: ../configs/base.yaml\n" if extends else ""
    own = "" if extends else "  alpha: 16\n  targets: [q_proj]\n"
    return f"name: {name}\n{head}model: {{base: {model}}}\nlora:\n  rank: {rank}\n{own}" \
           f"data:\n  train: [{{path: {data}}}]\n  max_seq_length: 64\n"  # fmt: skip


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir) -> dict:
    """A committed repository, then the working tree edited: a rank, a fragment value two recipes read, a data
    file, an invalid value, a recipe added and one deleted; e.yaml is untouched. Plans of both versions kept."""
    root = tmp_path_factory.mktemp("experiments")
    model = tiny_model_dir("llama")
    tiny.write_jsonl(root / "data" / "train.jsonl", tiny.reverse_rows(24))
    tiny.write_jsonl(root / "data" / "c.jsonl", tiny.reverse_rows(16, seed=1))
    (root / "configs").mkdir()
    (root / "configs" / "base.yaml").write_text(FRAGMENT)
    (root / "recipes").mkdir()
    for name in "abd":
        (root / "recipes" / f"{name}.yaml").write_text(_recipe(name, model))
    (root / "recipes" / "e.yaml").write_text(_recipe("e", model, extends=False))  # reads neither edit
    (root / "recipes" / "c.yaml").write_text(_recipe("c", model, "../data/c.jsonl", extends=False))
    (root / "recipes" / "g.yaml").write_text(_recipe("g", model, extends=False))
    (root / ".gitignore").write_text("runs/\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "recipes")
    before = {n: plan(load_recipe(root / "recipes" / f"{n}.yaml")) for n in "abc"}
    (root / "recipes" / "a.yaml").write_text(_recipe("a", model, rank=16))  # a rank
    (root / "configs" / "base.yaml").write_text(FRAGMENT.replace("[q_proj, v_proj]", "[q_proj, k_proj, v_proj]"))
    tiny.write_jsonl(root / "data" / "c.jsonl", tiny.reverse_rows(20, seed=1))  # a data file only c reads
    (root / "recipes" / "d.yaml").write_text(_recipe("d", model).replace("rank: 8", "rank: 8\n  dropout: 2"))
    (root / "recipes" / "f.yaml").write_text(_recipe("f", model, extends=False))
    (root / "recipes" / "g.yaml").unlink()
    after = {n: plan(load_recipe(root / "recipes" / f"{n}.yaml")) for n in "abc"}
    cwd = Path.cwd()
    os.chdir(root)
    try:
        result = review("HEAD")
    finally:
        os.chdir(cwd)
    return {"root": root, "result": result, "before": before, "after": after}


def test_lists_exactly_the_affected_recipes(repo):
    found = {r.path: r.status for r in repo["result"].recipes}
    assert found == {"recipes/a.yaml": "changed", "recipes/b.yaml": "changed", "recipes/c.yaml": "changed",
                     "recipes/d.yaml": "changed", "recipes/f.yaml": "added", "recipes/g.yaml": "deleted"}  # fmt: skip
    assert repo["result"].unchanged == 1  # e.yaml reads neither the fragment nor c.jsonl
