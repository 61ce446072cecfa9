"""How long `finetune` takes to prepare 100k chat rows (validate, render, tokenize, mask, check), the way it
did before 2026-12-02 and now, in the same run; then the data checks' own cost and the read from the cache.

    python scripts/bench_data.py [--rows 100000] [--turns 2] [--repeats 2]

Rows are multi-turn `messages` chats of varied length (about 60-300 tokens with the quickstart
tokenizer), written to a temporary jsonl; the cache lives in a temporary $FINETUNE_CACHE. "before" is
the preparation as it was, kept in tests/support/prepare_reference.py (reading, validating and splitting the rows
and the text part of the data checks are shared); the two are interleaved, alternating which goes first, so that
load from other jobs on the machine falls on both. CPU seconds include the worker processes'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
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


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the encoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(prepare, *args, **kwargs) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = prepare(*args, **kwargs)
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="before/now pairs, alternating which goes first")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE"] = str(Path(tmp) / "cache")
        from prepare_reference import reference_prepare

        from finetune.data import checks, prepare, prepare_data
        from finetune.modeling import load_tokenizer
        from finetune.recipe.load import load_recipe

        data = Path(tmp) / "chats.jsonl"
        write_rows(data, args.rows, args.turns)
        sets = [f"data.train=[{{path: {data}}}]", "data.eval=null", "data.max_seq_length=512"]
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", sets)
        tokenizer = load_tokenizer(recipe)
        import datasets  # noqa: F401  imported before the clock starts: the first preparation would pay for it

        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[tuple[float, float]]] = {"before": [], "now": []}
        outputs = {}
        for k in range(args.repeats):
            for label in ("before", "now") if k % 2 == 0 else ("now", "before"):
                with reference_prepare() if label == "before" else _nothing():
                    wall, cpu, prepared = timed(prepare_data, recipe, tokenizer, use_cache=False)
                runs[label].append((wall, cpu))
                outputs[label] = prepared
                print(f"  {label:6s} {wall:6.1f} s wall, {cpu:6.1f} s CPU")
        same = all(outputs["before"].train[c] == outputs["now"].train[c] for c in ("input_ids", "labels"))
        figures = outputs["before"].stats == outputs["now"].stats  # counts, lengths and every data check finding
        stats = outputs["now"].stats
        print(f"{stats.train_rows:,} rows, {stats.train_tokens:,} tokens ({stats.trained_tokens:,} trained); "
              f"tokens and labels identical before/now: {same}; figures and findings identical: {figures}")  # fmt: skip
        for k, (old, new) in enumerate(zip(runs["before"], runs["now"], strict=True)):
            print(f"pair {k + 1}: before {old[0]:.1f} s, now {new[0]:.1f} s wall ({old[0] / new[0]:.2f}x); "
                  f"CPU {old[1]:.1f} s / {new[1]:.1f} s ({old[1] / new[1]:.2f}x)")  # fmt: skip
        train, held_out = prepare.split(recipe, prepare.DataStats())
        tokens, _ = prepare._encode(tokenizer, train, recipe.data.train_on)
        wall, cpu, _ = timed(checks.check, train, held_out, tokens, 512, list(tokenizer.all_special_tokens),
                             recipe.data.near_duplicate_threshold)  # fmt: skip
        print(f"the data checks alone, in one process: {wall:.1f} s wall, {cpu:.1f} s CPU (within each preparation "
              "above: now their text part runs in an encoding worker)")  # fmt: skip
        wall, _, _ = timed(prepare_data, recipe, tokenizer)  # prepared, checked and stored
        cached_wall, _, cached = timed(prepare_data, recipe, tokenizer)
        print(f"prepare and store in the cache: {wall:.1f} s; from the cache: {cached_wall:.2f} s, "
              f"data checks cached with it: {cached.stats.checks == stats.checks and bool(stats.checks)}")  # fmt: skip


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
