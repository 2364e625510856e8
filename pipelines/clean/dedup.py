"""Deduplication and SkyPile's distribution filtering, as pure functions over arrays.

- exact: a hash of the normalized text (NFKC, lower case, whitespace removed);
- near-duplicate: MinHash over word 5-grams (Latin) or character 5-grams (Chinese), banded LSH,
  clusters by union-find; the first document of a cluster (in input order) is kept;
- recurring text: lines that occur in many documents are boilerplate and are cut out.

Shingles are hashed without building n-gram strings: each token is hashed once, and n-gram hashes
are combined from token hashes with vectorized arithmetic, which is what makes this fast.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

from pipelines.clean.text import latin_words

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_SPACE = re.compile(r"\s+")
_ROLL = np.uint64(0x9E3779B97F4A7C15)


def normalized_hash(text: str) -> int:
    """Exact-duplicate key: equal after NFKC, lower-casing and dropping whitespace."""
    normal = _SPACE.sub("", unicodedata.normalize("NFKC", text).lower())
    return xxhash.xxh3_64_intdigest(normal.encode("utf-8"))


def line_hashes(text: str, min_chars: int) -> np.ndarray:
    """Hashes of the distinct stripped lines long enough to count as recurring candidates."""
    lines = {line.strip() for line in text.split("\n")}
    return np.array(
        sorted(xxhash.xxh3_64_intdigest(line.encode("utf-8")) for line in lines if len(line) >= min_chars),
        dtype=np.uint64,
    )


def remove_lines(text: str, recurring: set[int], min_chars: int) -> tuple[str, int]:
    """Cut recurring lines out of a text; returns the text and how many lines were cut."""
    kept, cut = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if len(stripped) >= min_chars and xxhash.xxh3_64_intdigest(stripped.encode("utf-8")) in recurring:
            cut += 1
        else:
            kept.append(line)
    return "\n".join(kept).strip(), cut


def token_hashes(text: str, lang: str) -> np.ndarray:
    """One 64-bit hash per token: code points for Chinese (whitespace dropped), words otherwise."""
    if lang == "zh":
        compact = _SPACE.sub("", text)
        points = np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        return points * _ROLL + np.uint64(1)
    words = [w.lower() for w in latin_words(text) if w[0].isalnum()]
    return np.fromiter((xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in words), dtype=np.uint64,
                       count=len(words))


def shingle_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """32-bit hashes of every n-token window (a document shorter than n is one shingle)."""
    if len(tokens) == 0:
        return np.zeros(1, dtype=np.uint64)
    if len(tokens) < n:
        n = len(tokens)
    with np.errstate(over="ignore"):
        combined = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
        for offset in range(n):
            combined = (combined ^ tokens[offset : offset + len(combined)]) * _ROLL
    return np.unique(combined >> np.uint64(32))


class MinHasher:
    """MinHash signatures with ``bands * rows`` universal hash functions ((a*x+b) mod p)."""

    def __init__(self, bands: int, rows: int, ngram: int, seed: int):
        rng = np.random.default_rng(seed)
        count = bands * rows
        self.bands, self.rows, self.ngram = bands, rows, ngram
        self.a = rng.integers(1, int(_MERSENNE), size=count, dtype=np.uint64)
        self.b = rng.integers(0, int(_MERSENNE), size=count, dtype=np.uint64)

    def signature(self, text: str, lang: str) -> np.ndarray:
        shingles = shingle_hashes(token_hashes(text, lang), self.ngram)
        with np.errstate(over="ignore"):
            permuted = (shingles[:, None] * self.a[None, :] + self.b[None, :]) % _MERSENNE
        return (permuted & _MAX32).min(axis=0).astype(np.uint32)


def near_duplicate_clusters(signatures: np.ndarray, bands: int, rows: int, alive: np.ndarray) -> np.ndarray:
    """For each document, the index of its cluster's first member (itself when unique).

    ``signatures`` is (docs, bands*rows); only documents with ``alive`` set take part. Two
    documents are linked when all rows of any band agree; links are closed transitively.
    """
    parent = np.arange(len(signatures))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    members = np.flatnonzero(alive)
    for band in range(bands):
        block = np.ascontiguousarray(signatures[members, band * rows : (band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        duplicated = np.flatnonzero(first[inverse] != np.arange(len(members)))
        for position in duplicated:
            a, b = find(members[first[inverse[position]]]), find(members[position])
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(signatures))])


def recurring_lines(per_doc_hashes: list[np.ndarray], min_docs: int) -> np.ndarray:
    """Line hashes that occur in at least ``min_docs`` documents (each document counted once)."""
    if not per_doc_hashes:
        return np.zeros(0, dtype=np.uint64)
    values, counts = np.unique(np.concatenate(per_doc_hashes), return_counts=True)
    return values[counts >= min_docs]
