"""Helpers shared by the test files: a tiny recipe, the CLI in a subprocess, a run's files and losses, a hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tiny


def write_recipe(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    tiny.write_jsonl(tmp_path / "data" / "train.jsonl", tiny.reverse_rows(48))
    recipe = tmp_path / "recipe.yaml"
    body = f"""\
        name: tiny
        model: {{base: {model_dir}}}
        lora: {{rank: 8, alpha: 16}}
        data:
          train: [{{path: data/train.jsonl}}]
          eval: {{split_ratio: 0.25}}
          max_seq_length: 64
        train:
          max_steps: 8
          lr: 5.0e-3
          batch_size: 8
          warmup_ratio: 0.0
          gradient_checkpointing: false
          logging_every: 1
        eval:
          max_new_tokens: 6
        output_dir: runs/tiny
    """
    recipe.write_text(textwrap.dedent(body) + extra)
    return recipe


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def run_files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def hub_cache_with(model_dir: Path, cache: Path, repo_id: str, commit: str) -> None:
    """Lay a model out as huggingface_hub's cache does: content-addressed blobs, a snapshot of links, refs/main."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
