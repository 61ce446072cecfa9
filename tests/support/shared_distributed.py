"""Shared by test_distributed and the tests that import from it."""

from __future__ import annotations

from pathlib import Path

from helpers import write_recipe


def no_dropout_recipe(tmp_path: Path, model_dir: Path, batch: int) -> Path:
    path = write_recipe(tmp_path, model_dir)
    text = path.read_text().replace("lora: {rank: 8, alpha: 16}", "lora: {rank: 8, alpha: 16, dropout: 0.0}")
    text = text.replace("split_ratio: 0.25", "split_ratio: 0.3333")  # 32 training rows: no partial batch
    path.write_text(text.replace("batch_size: 8", f"batch_size: {batch}"))
    return path
