"""Parquet streamed in row groups, so a phase holds one batch of a shard, never the whole shard."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from skymoe.storage import Storage

# Documents per row group of the clean stage's per-shard files: a few MB of web text.
BATCH_ROWS = 2048


class RowWriter:
    """Collects row dicts and writes them a row group at a time."""

    def __init__(self, writer: pq.ParquetWriter, batch_rows: int):
        self.writer, self.batch_rows = writer, batch_rows
        self.rows: list[dict] = []
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.writer.schema))
            self.rows = []


@contextmanager
def row_writer(storage: Storage, uri: str, schema: pa.Schema, batch_rows: int = BATCH_ROWS) -> Iterator[RowWriter]:
    """A Parquet file written as rows arrive; it appears whole when the block ends, or not at all."""
    with storage.open_write(uri) as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        rows = RowWriter(writer, batch_rows)
        yield rows
        rows.flush()


def write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    with storage.open_write(uri) as handle:
        pq.write_table(table, handle, compression="zstd")


def read_table(storage: Storage, uri: str, columns: list[str] | None = None) -> pa.Table:
    """A whole (small) file: drop lists, decisions, partition outputs."""
    with storage.open_read(uri) as handle:
        return pq.ParquetFile(handle).read(columns=columns)


def iter_batches(storage: Storage, uri: str, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(first row, table) for each row group of a file, in order."""
    with storage.open_read(uri) as handle:
        reader = pq.ParquetFile(handle)
        first = 0
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group, columns=columns)
            yield first, table
            first += table.num_rows
