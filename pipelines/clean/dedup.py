"""Deduplication and SkyPile's distribution filtering, as pure functions over arrays.

- exact: a hash of the normalized text (NFKC, lower case, whitespace removed);
- near-duplicate: MinHash over word 5-grams (Latin) or character 5-grams (Chinese), banded LSH,
  candidate pairs per bucket, connected components over the pairs; the first document of a
  cluster (in input order) is kept;
- recurring text: lines that occur in many documents are boilerplate and are cut out.

Shingles are hashed without building n-gram strings: each token is hashed once, and n-gram hashes
are combined from token hashes with vectorized arithmetic, which is what makes this fast. The
MinHash permutations work in place on one (shingles x hashes) block, reducing mod 2^61-1 by
folding instead of dividing. All hashes are seeded or fixed (xxh3, numpy's PCG64 from ``seed``),
never Python's salted ``hash()``, so every process computes the same signatures.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_SPACE = re.compile(r"\s+")
_ROLL = np.uint64(0x9E3779B97F4A7C15)
_FOLD = np.uint64(61)
# Latin words for shingling: runs of letters/digits with inner apostrophes (the words the MinHash
# has always used). Deliberately not ``skymoe.pipelines.clean.text.latin_words``: that spaCy-like
# segmentation is tuned for the quality filters, and tuning it must not silently change MinHash
# signatures (it is also ~3x slower, and was no better for near-duplicate recall/precision).
_LATIN_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# Rows of the (shingles x hashes) block per step: bounds memory for very long documents.
_BLOCK_ROWS = 4096


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
    """One 64-bit hash per token: code points for Chinese (whitespace dropped), lower-cased words
    otherwise (punctuation is not a token)."""
    if lang == "zh":
        compact = _SPACE.sub("", text)
        points = np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        return points * _ROLL + np.uint64(1)
    words = _LATIN_WORD.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint64)
    # One lower() and one encode() for the whole document instead of one per word. Words hold no
    # spaces, and str.lower() is context free across a space (even Greek final sigma), so this
    # gives exactly the per-word ``w.lower().encode()`` bytes.
    pieces = " ".join(words).lower().encode("utf-8").split(b" ")
    return np.fromiter(map(xxhash.xxh3_64_intdigest, pieces), dtype=np.uint64, count=len(pieces))


def shingle_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """32-bit hashes of every n-token window (a document shorter than n is one shingle)."""
    if len(tokens) == 0:
        return np.zeros(1, dtype=np.uint64)
    if len(tokens) < n:
        n = len(tokens)
    combined = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around mod 2^64 is the point of the mixing
        for offset in range(n):
            combined ^= tokens[offset : offset + len(combined)]
            combined *= _ROLL
    combined >>= np.uint64(32)
    return np.unique(combined)


def _parameter(seed: int, index: int, name: str) -> int:
    return xxhash.xxh64_intdigest(f"{seed}:{index}:{name}".encode())


class MinHasher:
    """MinHash signatures with ``bands * rows`` universal hash functions ((a*x+b) mod p)."""

    def __init__(self, bands: int, rows: int, ngram: int, seed: int):
        count = bands * rows
        self.bands, self.rows, self.ngram = bands, rows, ngram
        # Parameters from xxhash of (seed, index), not numpy's generator: a stored dedup index must
        # stay comparable with new signatures after a numpy upgrade.
        self.a = np.array([_parameter(seed, i, "a") % (int(_MERSENNE) - 1) + 1 for i in range(count)], dtype=np.uint64)
        self.b = np.array([_parameter(seed, i, "b") % int(_MERSENNE) for i in range(count)], dtype=np.uint64)

    def signature(self, text: str, lang: str) -> np.ndarray:
        shingles = shingle_hashes(token_hashes(text, lang), self.ngram)
        lowest = np.full(len(self.a), _MAX32, dtype=np.uint64)
        for start in range(0, len(shingles), _BLOCK_ROWS):
            np.minimum(lowest, self._permuted_min(shingles[start : start + _BLOCK_ROWS]), out=lowest)
        return lowest.astype(np.uint32)

    def _permuted_min(self, shingles: np.ndarray) -> np.ndarray:
        """min over shingles of ((a*x + b) mod 2^64) mod (2^61-1), low 32 bits, per hash function.

        Same values as ``(x*a + b) % p & 0xFFFFFFFF``, but in place on one block and with the
        Mersenne reduction done by folding (x = hi*2^61 + lo = hi + lo mod p), which avoids
        numpy's 64-bit division and the temporaries that cost ~3x the arithmetic itself.
        """
        block = np.multiply(shingles[:, None], self.a[None, :])  # wraps mod 2^64, as before
        block += self.b
        high = block >> _FOLD
        block &= _MERSENNE
        block += high  # now in [0, p + 7]
        np.subtract(block, _MERSENNE, out=block, where=block >= _MERSENNE)
        block &= _MAX32
        return block.min(axis=0)


def band_records(signatures: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The LSH buckets of each document: for every document and band, the band index, the band's
    ``rows`` values as one ``4 * rows``-byte key, and a 64-bit hash of both that spreads buckets over
    partitions. Two documents share a bucket when band and key are equal (all rows agree)."""
    n = len(signatures)
    block = np.ascontiguousarray(signatures, dtype=np.uint32).reshape(n * bands, rows)
    band = np.tile(np.arange(bands, dtype=np.uint16), n)
    spread = band.astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        for r in range(rows):
            spread = (spread ^ block[:, r].astype(np.uint64)) * _ROLL
    return band, block, spread ^ (spread >> np.uint64(29))


def bucket_pairs(band: np.ndarray, keys: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs from bucket members: each member is paired with its bucket's first document
    (smallest order). Star edges keep every bucket connected, so the clusters they give are the
    clusters of "shares any bucket", with memory growing with duplicates, not with documents."""
    if not len(orders):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    width = keys.shape[1] * keys.dtype.itemsize
    composite = np.concatenate([band.astype(">u2").view(np.uint8).reshape(-1, 2),
                                np.ascontiguousarray(keys).view(np.uint8).reshape(-1, width)], axis=1)
    _, bucket = np.unique(np.ascontiguousarray(composite).view(np.dtype((np.void, width + 2))).ravel(),
                          return_inverse=True)
    order = np.lexsort((orders, bucket))
    bucket, members = bucket[order], orders[order]
    starts = np.r_[True, bucket[1:] != bucket[:-1]]
    first = members[np.maximum.accumulate(np.where(starts, np.arange(len(members)), 0))]
    pairs = np.unique(np.stack([first[~starts], members[~starts]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def cluster_roots(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components over the pairs alone: every document that appears in a pair, and the
    smallest document of its component (its root; a document is kept when it is its own root)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, index = np.unique(np.concatenate([a, b]), return_inverse=True)
    if not len(nodes):
        return nodes, nodes
    graph = coo_matrix((np.ones(len(a), np.int8), (index[: len(a)], index[len(a) :])), shape=(len(nodes),) * 2)
    _, label = connected_components(graph, directed=False)
    # nodes are sorted, so a label's first position holds its smallest document
    _, first = np.unique(label, return_index=True)
    return nodes, nodes[first][label]


def near_duplicate_clusters(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """For each document (in order), the index of its cluster's first member (itself when unique):
    the partitioned phases' functions composed in one process (benchmarks and tests)."""
    band, keys, _ = band_records(signatures, bands, rows)
    nodes, roots = cluster_roots(*bucket_pairs(band, keys, np.repeat(np.arange(len(signatures)), bands)))
    root = np.arange(len(signatures))
    root[nodes] = roots
    return root
