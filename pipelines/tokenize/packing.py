"""Packing: token ids of whole documents -> fixed-length training rows, as Arrow arrays.

Documents are concatenated (each followed by EOS) into one stream per (split, language) and cut
into rows of ``seq_len + 1`` ids (the extra id is the last position's target). A row records
where documents start inside it, so a loader can build per-document attention masks. The tail
shorter than a row is dropped and counted. Everything is vectorized: rows are slices of one
numpy array, and the Arrow list columns are built from offsets without copying per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class PackedRows:
    ids: np.ndarray  # (rows, seq_len + 1)
    # Where documents begin inside their row: row r's offsets are
    # doc_starts[start_offsets[r] : start_offsets[r + 1]] (an Arrow list column's layout).
    doc_starts: np.ndarray  # int32
    start_offsets: np.ndarray  # (rows + 1,)
    dropped_tokens: int


def pack(ids: np.ndarray, lengths: np.ndarray, eos_id: int, row_len: int, dtype: np.dtype) -> PackedRows:
    """Concatenate documents (each + EOS) and cut the stream into rows of ``row_len`` ids.

    ``ids`` holds the documents' ids one after another, ``lengths`` how many each has.
    """
    if not len(lengths):
        return PackedRows(np.zeros((0, row_len), dtype=dtype), np.zeros(0, np.int32), np.zeros(1, np.int64), 0)
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64) + 1)  # each document is followed by EOS
    starts = np.concatenate([[0], ends[:-1]])
    stream = np.empty(int(ends[-1]), dtype=dtype)
    is_eos = np.zeros(len(stream), dtype=bool)
    is_eos[ends - 1] = True
    stream[is_eos] = eos_id
    stream[~is_eos] = ids
    rows = len(stream) // row_len
    # Document starts falling in row r are those in [r*row_len, (r+1)*row_len).
    bounds = np.searchsorted(starts, np.arange(rows + 1) * row_len)
    doc_starts = (starts[: bounds[-1]] % row_len).astype(np.int32)
    return PackedRows(stream[: rows * row_len].reshape(rows, row_len), doc_starts, bounds,
                      len(stream) - rows * row_len)


def rows_table(rows: PackedRows, lang: str, source: str, start: int, stop: int) -> pa.Table:
    """Rows ``start:stop`` as an Arrow table; list columns share the numpy buffers' layout.

    Arrays are made from buffers, not with ``pa.array``: that imports pandas (~0.3 s per process)
    to look for pandas input.
    """
    ids = rows.ids[start:stop]
    count, row_len = ids.shape
    input_ids = pa.ListArray.from_arrays(_numeric(np.arange(count + 1, dtype=np.int32) * row_len),
                                         _numeric(np.ascontiguousarray(ids).reshape(-1)))
    first, last = rows.start_offsets[start], rows.start_offsets[stop]
    doc_starts = pa.ListArray.from_arrays(_numeric((rows.start_offsets[start : stop + 1] - first).astype(np.int32)),
                                          _numeric(rows.doc_starts[first:last]))
    return pa.Table.from_arrays([input_ids, doc_starts, _repeated(lang, count), _repeated(source, count)],
                                names=["input_ids", "doc_starts", "lang", "source"])


def _numeric(values: np.ndarray) -> pa.Array:
    """A contiguous numpy array as an Arrow array without nulls, sharing its buffer."""
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _repeated(value: str, count: int) -> pa.Array:
    """``value`` ``count`` times as an Arrow string array."""
    data = value.encode("utf-8")
    offsets = np.arange(count + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data * count)])
