"""data/near.py: datasketch's MinHash computed in numpy, word shingles as str.split finds them, exact verification."""

import random

import numpy as np
import pytest

from finetune.data import near

TEXTS = [
    "The quick  brown fox jumps",
    "the quick brown fox jumps over",
    "a",
    "",
    "x y",
    "héllo wörld\xa0again now",  # a no-break space splits words, as in str.split
    "tab\tsep\nline end\x00nul inside",
]


def _shingles(text: str) -> set[str]:
    words = text.replace("\x00", " ").lower().split()  # NUL separates rows in near.py: it counts as a space
    return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def test_signatures_equal_datasketch_minhash():
    datasketch = pytest.importorskip("datasketch")
    hashes, offsets = near.shingle_hashes(TEXTS)
    sig = near.signatures(hashes, offsets)
    for i in range(len(TEXTS)):
        m = datasketch.MinHash(num_perm=near.NUM_PERM, seed=near.SEED, scheme="affine32", hashfunc=int)
        m.update_batch(hashes[offsets[i] : offsets[i + 1]].tolist())
        assert (m.hashvalues == sig[i]).all(), TEXTS[i]


def test_shingles_are_word_trigrams_of_the_lowercased_split():
    rng = random.Random(0)
    vocab = ["Alpha", "beta", "GAMMA", "délta", "ε", "z"]
    texts = [" \t".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(60)] + TEXTS
    hashes, offsets = near.shingle_hashes(texts)
    for i, text in enumerate(texts):
        assert len(np.unique(hashes[offsets[i] : offsets[i + 1]])) == len(_shingles(text)), text
    for i, j in [(0, 1), (2, 3), (60, 61), (61, 65)]:
        want = len(_shingles(texts[i]) & _shingles(texts[j])) / len(_shingles(texts[i]) | _shingles(texts[j]))
        assert near.jaccard(hashes, offsets, i, j) == pytest.approx(want)


def test_planted_near_copies_are_found_and_only_true_pairs_reported():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(3000)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(40, 80))) for _ in range(400)]
    planted = []
    for src in range(0, 400, 4):
        words = texts[src].split()
        words[rng.randrange(len(words))] = "changed"  # one word: Jaccard about 0.9-0.95
        planted.append((src, len(texts)))
        texts.append(" ".join(words))
    found = near.Sketch.of(texts).similar(0.85)
    assert {(i, j) for i, j, _ in found} == set(planted)
    assert all(s >= 0.85 for _, _, s in found)


def test_bands_make_a_pair_at_the_threshold_a_candidate():
    for threshold in (0.5, 0.7, 0.85, 0.95):
        r = near.band_rows(threshold)
        assert 1 - (1 - threshold**r) ** (near.NUM_PERM // r) >= near.RECALL_AT_THRESHOLD
