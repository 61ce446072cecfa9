"""Near-duplicate pairs among many texts in seconds: MinHash signatures and LSH banding done in numpy.

The MinHash is datasketch's own (its `affine32` scheme, permutations drawn from its seed): a signature
here equals `datasketch.MinHash(num_perm=64, seed=1, scheme="affine32")` updated with the same shingle
hashes, which tests/data/test_near.py checks, so datasketch is a test dependency only. What differs is where the time goes: the
per-row Python (a sha1 per shingle, one numpy call per row, one dict per band in `MinHashLSH`) cost
92 s on 100k rows; here words are found and hashed on the bytes of a thousand rows at a time, and the
LSH index is a sort per band. Candidates are then verified by their exact Jaccard similarity, so a
reported pair is a true one (precision 1), and the bands are chosen so that a pair at the threshold
becomes a candidate with probability >= 0.995 (datasketch's own choice for 64 permutations at 0.85,
4 bands of 15, finds such a pair 30% of the time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np

NUM_PERM = 64  # permutations; the bands make recall, exact verification makes precision
SHINGLE = 3  # words per shingle
SEED = 1
RECALL_AT_THRESHOLD = 0.995  # chance that a pair exactly at the threshold becomes a candidate
PREFILTER = 0.25  # candidates whose signatures agree on fewer than threshold - this share are not verified
BLOCK = 1000  # rows hashed together

# str.split()'s whitespace beyond ASCII; ASCII whitespace is found on the bytes.
_UNICODE_SPACE = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[0, 9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # NUL separates rows
_P = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


@cache
def _permutations() -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) that datasketch's MinHash(num_perm, seed, scheme="affine32") draws, drawn the same way here
    (importing datasketch costs a second, most of it scipy): a odd, so each permutation is a bijection."""
    gen = np.random.RandomState(SEED)
    a = gen.randint(0, 1 << 31, NUM_PERM, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return a, gen.randint(0, 1 << 32, NUM_PERM, dtype=np.uint32)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer, as datasketch pre-mixes every input of its affine32 scheme."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A 32-bit hash per word 3-gram (lower-cased, words as `str.split` finds them) of each text, concatenated,
    and the offsets where each text's run starts (len(texts) + 1). A text of fewer words is one shingle."""
    parts, counts = [], []
    for start in range(0, len(texts), BLOCK):
        h, n = _block_shingles(texts[start : start + BLOCK])
        parts.append(h)
        counts.append(n)
    sizes = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)), offsets


def _block_shingles(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    joined = "\x00".join(t.replace("\x00", " ") for t in texts).lower()
    if not joined.isascii():
        joined = _UNICODE_SPACE.sub(" ", joined)
    data = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    space = _SPACE[data]
    edges = np.diff(np.concatenate([[0], (~space).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    row = np.searchsorted(np.flatnonzero(data == 0), starts)  # separators before a word = its row
    words = _word_hashes(data, starts, ends)
    # Every row gets at least one shingle: a row without words gets one word of hash 0.
    missing = np.flatnonzero(np.bincount(row, minlength=len(texts)) == 0)
    if len(missing):
        at = np.searchsorted(row, missing)
        row, words = np.insert(row, at, missing), np.insert(words, at, np.uint64(0))
    nxt1 = _shifted(words, row, 1)
    nxt2 = _shifted(words, row, 2)
    first = np.concatenate([[True], row[1:] != row[:-1]])
    short = np.bincount(row, minlength=len(texts))[row] < SHINGLE
    keep = np.concatenate([row[2:] == row[:-2], [False, False]])[: len(row)] | (first & short)
    mixed = _fmix64(words[keep] * _K1 + nxt1[keep] * _K2 + nxt2[keep])
    return (mixed >> np.uint64(32)).astype(np.uint32), np.bincount(row[keep], minlength=len(texts))


def _shifted(words: np.ndarray, row: np.ndarray, k: int) -> np.ndarray:
    """The hash of the word k places on in the same row, 0 past the row's end."""
    out = np.zeros_like(words)
    if len(words) > k:
        same = row[k:] == row[:-k]
        out[:-k] = np.where(same, words[k:], np.uint64(0))
    return out


def _word_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Polynomial hash of each byte span, from prefix sums modulo 2^64, mixed."""
    if not len(starts):
        return np.zeros(0, dtype=np.uint64)
    powers, inverse = _powers(len(data))
    prefix = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(data.astype(np.uint64) * powers, out=prefix[1:])  # wraps modulo 2^64, as intended
    return _fmix64((prefix[ends] - prefix[starts]) * inverse[starts])


_POWERS: list[np.ndarray] = []


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i modulo 2^64 for i < n, kept between blocks (a block of 1,000 rows is about 1 MB)."""
    if not _POWERS or len(_POWERS[0]) < n:
        size = max(n, 1 << 20)
        powers, inverse = np.full(size, _P, dtype=np.uint64), np.full(size, _P_INV, dtype=np.uint64)
        powers[0] = inverse[0] = 1
        _POWERS[:] = [np.cumprod(powers), np.cumprod(inverse)]
    return _POWERS[0][:n], _POWERS[1][:n]


def signatures(hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(rows, NUM_PERM) MinHash signatures: per row, the minimum of each permutation over its shingles.

    One permutation at a time over all shingles: a 1-D `minimum.reduceat` is about 15x faster than the
    same reduction along the first axis of a (shingles, permutations) matrix."""
    a, b = _permutations()
    rows = len(offsets) - 1
    out = np.empty((NUM_PERM, rows), dtype=np.uint32)
    if rows:
        mixed = _fmix32(hashes)
        tmp = np.empty_like(mixed)
        for k in range(NUM_PERM):
            np.multiply(mixed, a[k], out=tmp)  # wraps modulo 2^32, as datasketch's affine32 does
            np.add(tmp, b[k], out=tmp)
            out[k] = np.minimum.reduceat(tmp, offsets[:-1])
    return np.ascontiguousarray(out.T)


def band_rows(threshold: float) -> int:
    """Rows per LSH band: the most for which a pair at `threshold` is a candidate with RECALL_AT_THRESHOLD."""
    best = 1
    for r in range(1, NUM_PERM + 1):
        if 1 - (1 - threshold**r) ** (NUM_PERM // r) >= RECALL_AT_THRESHOLD:
            best = r
    return best


def candidates(sig: np.ndarray, threshold: float) -> np.ndarray:
    """(k, 2) index pairs i < j sharing a band: each row with its band bucket's first row and its predecessor."""
    r = band_rows(threshold)
    n = len(sig)
    pairs = []
    for band in range(NUM_PERM // r):
        cols = sig[:, band * r : (band + 1) * r].astype(np.uint64)
        key = np.zeros(n, dtype=np.uint64)
        for c in range(r):
            key = _fmix64(key * _K1 + cols[:, c])
        order = np.argsort(key, kind="stable")  # equal keys keep row order: a bucket's first is its earliest row
        sorted_key = key[order]
        same = np.concatenate([[False], sorted_key[1:] == sorted_key[:-1]])
        run_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
        first, pred = order[run_start], np.concatenate([order[:1], order[:-1]])
        for other in (first, pred):
            pick = same & (other != order)
            pairs.append(np.stack([other[pick], order[pick]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    found = np.concatenate(pairs)
    return np.unique(found, axis=0) if len(found) else found.reshape(0, 2)


def jaccard(hashes: np.ndarray, offsets: np.ndarray, i: int, j: int) -> float:
    """Exact Jaccard similarity of two rows' shingle sets."""
    x = np.unique(hashes[offsets[i] : offsets[i + 1]])
    y = np.unique(hashes[offsets[j] : offsets[j + 1]])
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / max(len(x) + len(y) - inter, 1)


@dataclass
class Sketch:
    """Shingle hashes and signatures of many texts, computed once for every check that compares them."""

    hashes: np.ndarray
    offsets: np.ndarray  # global positions in `hashes`, so a part can share them
    sig: np.ndarray

    @classmethod
    def of(cls, texts: list[str]) -> Sketch:
        hashes, offsets = shingle_hashes(texts)
        return cls(hashes, offsets, signatures(hashes, offsets))

    def part(self, start: int) -> Sketch:
        """The rows from `start` on, numbered from 0."""
        return Sketch(self.hashes, self.offsets[start:], self.sig[start:])

    def similar(self, threshold: float) -> list[tuple[int, int, float]]:
        """(i, j, Jaccard), i < j, for the pairs whose word 3-gram sets have Jaccard >= threshold: LSH
        candidates (see RECALL_AT_THRESHOLD), each verified exactly."""
        pairs = candidates(self.sig, threshold)
        if not len(pairs):
            return []
        chunks = np.split(pairs, range(1 << 17, len(pairs), 1 << 17))  # bounded memory for the comparison
        agree = np.concatenate([(self.sig[p[:, 0]] == self.sig[p[:, 1]]).mean(axis=1) for p in chunks])
        out = []
        for i, j in pairs[agree >= threshold - PREFILTER].tolist():
            sim = jaccard(self.hashes, self.offsets, i, j)
            if sim >= threshold:
                out.append((i, j, sim))
        return out
