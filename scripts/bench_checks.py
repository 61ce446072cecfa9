"""What the data checks cost on 100k rows, and how well near-duplicates are found, against datasketch's own path.

    python scripts/bench_checks.py [--rows 100000] [--planted 2000] [--slow]

1. Cost: `finetune.data.checks.check` on scripts/bench_data.py's rows (two-turn chats), timed; with
   `--slow`, the previous implementation's near-duplicate search on the same rows in the same run
   (datasketch `MinHash.bulk` with sha1 per shingle, `MinHashLSH` insert and query per row).
2. Quality on a synthetic set with planted near-copies (each a row with a share of its words replaced,
   so true Jaccard spreads over 0.5-1.0): recall = planted pairs with true word 3-gram Jaccard >=
   threshold that are reported; precision = reported pairs whose true Jaccard is >= threshold (computed
   exactly with Python sets), for both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_data import write_rows

from finetune.data import checks
from finetune.data.formats import Sample
from finetune.data.near import Sketch
from finetune.data.tokens import Tokens

THRESHOLD = 0.85


def shingles(text: str) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def true_jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / max(len(x | y), 1)


def slow_pairs(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    """The previous implementation: datasketch MinHash.bulk (sha1 per shingle) and MinHashLSH per row."""
    from datasketch import MinHash, MinHashLSH

    sigs = MinHash.bulk([[g.encode() for g in shingles(t)] for t in texts], num_perm=64, seed=1)
    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    out = set()
    for i, sig in enumerate(sigs):
        out |= {(j, i) for j in lsh.query(sig)}
        lsh.insert(i, sig)
    return out


def fast_pairs(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    return {(i, j) for i, j, _ in Sketch.of(texts).similar(threshold)}


def planted(n_base: int, n_copies: int, prefix: int = 0, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """Rows of 40-120 words from a 5,000-word vocabulary (after `prefix` words every row shares, as a long
    system prompt would be), and near-copies with 0-15% of their own words replaced."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    shared = " ".join(f"s{i}" for i in range(prefix))
    texts = [" ".join(rng.choices(vocab, k=rng.randint(40, 120))) for _ in range(n_base)]
    pairs = []
    for _ in range(n_copies):
        src = rng.randrange(n_base)
        words = texts[src].split()
        rate = rng.uniform(0.0, 0.15)
        words = [rng.choice(vocab) if rng.random() < rate else w for w in words]
        pairs.append((src, len(texts)))
        texts.append(" ".join(words))
    return [f"{shared} {t}" for t in texts], pairs


def quality(texts: list[str], planted_pairs: list[tuple[int, int]], found: set[tuple[int, int]]) -> str:
    positives = {p for p in planted_pairs if true_jaccard(texts[p[0]], texts[p[1]]) >= THRESHOLD}
    hits = len(positives & found)
    right = sum(true_jaccard(texts[i], texts[j]) >= THRESHOLD for i, j in found)
    return (f"recall {hits}/{len(positives)} = {hits / max(len(positives), 1):.3f}, "
            f"precision {right}/{len(found)} = {right / max(len(found), 1):.3f}")  # fmt: skip


def load(path: Path) -> list[Sample]:
    out = []
    with path.open() as fh:
        for i, line in enumerate(fh, 1):
            msgs = tuple((m["role"], m["content"]) for m in json.loads(line)["messages"])
            out.append(Sample(f"chats.jsonl:{i}", messages=msgs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--planted", type=int, default=2000)
    parser.add_argument("--slow", action="store_true", help="also time the previous implementation")
    parser.add_argument("--prefix", type=int, default=0, help="words every planted row starts with")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}")
    if args.rows:
        cost(args)
    quality_of_both(args)


def cost(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chats.jsonl"
        write_rows(path, args.rows, 2)
        train = load(path)
    encoded = Tokens.of([([1] * 300, [-100] * 150 + [1] * 150)] * len(train))  # lengths do not matter for the cost
    start, cpu = time.perf_counter(), time.process_time()
    result = checks.check(train, [], encoded, 512, ["<|im_end|>"], THRESHOLD)
    print(f"checks on {len(train):,} rows: {time.perf_counter() - start:.1f} s wall, "
          f"{time.process_time() - cpu:.1f} s CPU ({result.summary()})")  # fmt: skip
    if args.slow:
        texts = checks.Texts.of(train).wholes
        start, cpu = time.perf_counter(), time.process_time()
        slow_pairs(texts, THRESHOLD)
        print(f"previous near-duplicate search alone on the same rows: {time.perf_counter() - start:.1f} s wall, "
              f"{time.process_time() - cpu:.1f} s CPU, load {os.getloadavg()[0]:.1f}")  # fmt: skip


def quality_of_both(args: argparse.Namespace) -> None:
    texts, pairs = planted(args.planted * 4, args.planted, args.prefix)
    for name, search in (("new", fast_pairs), ("previous", slow_pairs)):
        start = time.perf_counter()
        found = search(texts, THRESHOLD)
        print(f"{name}: {quality(texts, pairs, found)} ({len(texts):,} rows, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
