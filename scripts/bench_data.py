"""How long `finetune` takes to prepare 100k chat rows: validate, render, tokenize and mask; then from the cache.

    python scripts/bench_data.py [--rows 100000] [--turns 2]

Rows are multi-turn `messages` chats of varied length (about 60-300 tokens with the quickstart
tokenizer), written to a temporary jsonl; the cache lives in a temporary $FINETUNE_CACHE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_rows(path: Path, n_rows: int, turns: int) -> None:
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "list",
        "of",
        "items",
        "value",
        "returns",
        "object",
        "file",
        "when",
        "name",
        "data",
        "path",
        "for",
        "each",
        "new",
        "key",
        "string",
    ]
    with path.open("w") as fh:
        for _ in range(n_rows):
            messages = [{"role": "system", "content": "You answer briefly."}]
            for _ in range(turns):
                messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(5, 60)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(5, 80)))})
            fh.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE"] = str(Path(tmp) / "cache")
        from finetune.data import prepare_data
        from finetune.modeling import load_tokenizer
        from finetune.recipe.load import load_recipe

        data = Path(tmp) / "chats.jsonl"
        write_rows(data, args.rows, args.turns)
        sets = [f"data.train=[{{path: {data}}}]", "data.eval=null", "data.max_seq_length=512"]
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", sets)
        tokenizer = load_tokenizer(recipe)
        timings = {}
        for label in ("cold", "cached"):
            start = time.perf_counter()
            stats = prepare_data(recipe, tokenizer).stats
            timings[label] = time.perf_counter() - start
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores")
        print(f"{stats.train_rows:,} rows, {stats.train_tokens:,} tokens ({stats.trained_tokens:,} trained)")
        print(f"prepare: {timings['cold']:.1f} s ({stats.train_rows / timings['cold']:,.0f} rows/s); "
              f"from the cache: {timings['cached']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
