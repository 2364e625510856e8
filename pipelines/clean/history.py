"""What earlier cleaning outputs kept, for an incremental run to deduplicate new documents against.

Every cleaning output stores two small artifacts beside its data (written by the ``decide`` phase):
- ``dedup/kept_index.parquet``: exact hash and MinHash signature of each document it kept;
- ``dedup/line_counts.parquet``: for every line hash, the number of kept documents containing it,
  accumulated over this output and all outputs it was deduplicated against.
An incremental run reads the kept indexes of all earlier generations (new documents never
re-enter as duplicates of anything kept before) and the latest line counts (a line becomes
recurring once enough documents of any generation contain it). Quality buckets keep the first
generation's score thresholds, so a small batch of new documents is judged by the same bar.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from skymoe.stage import StageRef, read_manifest
from skymoe.storage import Storage

KEPT_INDEX = "dedup/kept_index.parquet"
LINE_COUNTS = "dedup/line_counts.parquet"
KEPT_SCHEMA = pa.schema([("key", pa.string()), ("exact_hash", pa.uint64()), ("minhash", pa.list_(pa.uint32()))])
LINE_COUNT_SCHEMA = pa.schema([("line_hash", pa.uint64()), ("docs", pa.int64())])


class HistoryError(ValueError):
    """An earlier output named as history is incomplete or predates the kept index."""


@dataclass(frozen=True)
class History:
    """The documents kept by earlier generations; empty for a stand-alone run."""

    keys: list[str]  # "<fingerprint>/<shard>/<row>" of each kept document
    exact_hashes: np.ndarray  # uint64, one per key
    signatures: np.ndarray  # uint32 (keys, bands*rows)
    line_hashes: np.ndarray  # uint64, sorted
    line_docs: np.ndarray  # int64, kept documents containing each line
    bucket_edges: dict[str, list[float]]

    @classmethod
    def empty(cls, signature_width: int) -> "History":
        return cls([], np.zeros(0, np.uint64), np.zeros((0, signature_width), np.uint32), np.zeros(0, np.uint64),
                   np.zeros(0, np.int64), {})

    def __len__(self) -> int:
        return len(self.keys)

    def exact_matches(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the index of an earlier document with that hash, or -1."""
        if not len(self):
            return np.full(len(hashes), -1)
        order = np.argsort(self.exact_hashes, kind="stable")
        position = np.minimum(np.searchsorted(self.exact_hashes, hashes, sorter=order), len(order) - 1)
        found = self.exact_hashes[order[position]] == hashes
        return np.where(found, order[position], -1)


def load_history(storage: Storage, prior: Sequence[StageRef], signature_width: int) -> History:
    """The kept indexes of ``prior`` (oldest first), the newest line counts, the first bucket edges."""
    if not prior:
        return History.empty(signature_width)
    keys, hashes, signatures = [], [], []
    for ref in prior:
        if read_manifest(storage, ref) is None:
            raise HistoryError(f"earlier cleaning output {ref.uri} is incomplete (no manifest)")
        if not storage.exists(ref.path(KEPT_INDEX)):
            raise HistoryError(f"earlier cleaning output {ref.uri} has no {KEPT_INDEX} (made by an older skymoe)")
        table = _read(storage, ref.path(KEPT_INDEX))
        keys += [f"{ref.fingerprint}/{key}" for key in table["key"].to_pylist()]
        hashes.append(table["exact_hash"].to_numpy())
        signatures += [np.asarray(sig, dtype=np.uint32) for sig in table["minhash"].to_pylist()]
    lines = _read(storage, prior[-1].path(LINE_COUNTS))
    first = read_manifest(storage, prior[0])
    return History(
        keys=keys,
        exact_hashes=np.concatenate(hashes).astype(np.uint64),
        signatures=np.stack(signatures) if signatures else np.zeros((0, signature_width), np.uint32),
        line_hashes=lines["line_hash"].to_numpy().astype(np.uint64),
        line_docs=lines["docs"].to_numpy().astype(np.int64),
        bucket_edges=first.extra.get("quality_buckets", {}),
    )


def accumulate_line_counts(history: History, per_doc_hashes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """History's line counts plus one per document (each document counted once per line), sorted."""
    new = [np.unique(h) for h in per_doc_hashes if len(h)]
    values = np.concatenate([history.line_hashes, *new]) if new else history.line_hashes
    weights = np.concatenate([history.line_docs, *(np.ones(len(h), np.int64) for h in new)]) if new \
        else history.line_docs
    unique, inverse = np.unique(values, return_inverse=True)
    return unique, np.bincount(inverse, weights=weights, minlength=len(unique)).astype(np.int64)


def write_parquet(storage: Storage, uri: str, columns: dict[str, object], schema: pa.Schema) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


def _read(storage: Storage, uri: str) -> pa.Table:
    return pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).read()
