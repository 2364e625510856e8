"""The shuffle under the clean stage's global phases: hash-partitioned Parquet files and document order.

A per-shard task writes one file whose row group ``p`` holds the records of hash partition ``p``
(every partition has a row group, empty or not). A per-partition task then reads row group ``p``
of every shard's file and nothing else, so its memory is bounded by its partition, and on S3 each
read is a ranged request. Results that go back to shards (drop lists) are files sorted by document
order, read per shard through the row groups' order statistics.

Document order: the int64 ``generation << 56 | shard << 28 | row``, where ``shard`` is the input
file's position in its run and ``generation`` the run's position in an incremental series (earlier
generations' documents come first). "First occurrence wins" is then "smallest order wins".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from skymoe.storage import Storage

_SHARD_BITS = 28
_GENERATION_SHIFT = 56
_ROW_MASK = (1 << _SHARD_BITS) - 1
MAX_GENERATIONS = 1 << (63 - _GENERATION_SHIFT)
# Row groups of a drop list: small enough that a shard's reader skips most of the file.
_SORTED_ROW_GROUP = 65536


def doc_order(generation: int, shard: int, rows: np.ndarray) -> np.ndarray:
    if shard >> _SHARD_BITS or (len(rows) and int(rows.max()) >> _SHARD_BITS):
        raise ValueError(f"at most {1 << _SHARD_BITS:,} input files and as many documents per file")
    return (np.int64(generation) << _GENERATION_SHIFT) | (np.int64(shard) << _SHARD_BITS) | rows.astype(np.int64)


def with_generation(orders: np.ndarray, generation: int) -> np.ndarray:
    """Orders stored as generation 0 (kept-document records), placed in their generation when read."""
    return orders.astype(np.int64) | (np.int64(generation) << np.int64(_GENERATION_SHIFT))


def generation_of(orders: np.ndarray) -> np.ndarray:
    return orders >> np.int64(_GENERATION_SHIFT)


def split_order(order: int) -> tuple[int, int, int]:
    """(generation, shard, row) of a document order."""
    return order >> _GENERATION_SHIFT, (order >> _SHARD_BITS) & ((1 << (_GENERATION_SHIFT - _SHARD_BITS)) - 1), \
        order & _ROW_MASK


def shard_range(generation: int, shard: int) -> tuple[int, int]:
    """The orders [low, high) of one shard's documents."""
    low = int(doc_order(generation, shard, np.zeros(1, np.int64))[0])
    return low, low + (1 << _SHARD_BITS)


def mix64(values: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (splitmix64): spreads structured keys evenly over partitions."""
    x = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


class PartitionedWriter:
    """Writes records in chunks of ``partitions`` row groups: row group ``i * partitions + p`` holds
    chunk ``i``'s records of partition ``p`` (empty ones too), so a shard can be written as it is
    read and partition ``p`` is still found by its row-group index alone."""

    def __init__(self, writer: pq.ParquetWriter, partitions: int):
        self.writer, self.partitions = writer, partitions

    def write(self, table: pa.Table, partition: np.ndarray) -> None:
        order = np.argsort(partition, kind="stable")
        table = table.take(pa.array(order)).cast(self.writer.schema).combine_chunks()
        bounds = np.searchsorted(partition[order], np.arange(self.partitions + 1))
        for p in range(self.partitions):
            part = table.slice(bounds[p], bounds[p + 1] - bounds[p])
            # write_table skips an empty table; an empty batch still makes the row group that keeps the layout
            batch = part.to_batches()[0] if part.num_rows else pa.RecordBatch.from_pylist([], schema=self.writer.schema)
            self.writer.write_batch(batch, row_group_size=max(1, part.num_rows))


@contextmanager
def partitioned_writer(storage: Storage, uri: str, schema: pa.Schema, partitions: int) -> Iterator[PartitionedWriter]:
    with storage.open_write(uri) as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        yield PartitionedWriter(writer, partitions)


def read_partition(storage: Storage, uris: Iterable[str], partition: int, partitions: int,
                   columns: list[str] | None = None) -> list[pa.Table]:
    """Partition ``partition``'s row groups of every file written by ``PartitionedWriter``."""
    parts = []
    for uri in uris:
        with storage.open_read(uri) as handle:
            reader = pq.ParquetFile(handle)
            if reader.num_row_groups % partitions:
                raise ValueError(f"{uri} has {reader.num_row_groups} row groups, not a multiple of {partitions} "
                                 "partitions")
            groups = list(range(partition, reader.num_row_groups, partitions))
            if groups:
                parts.append(reader.read_row_groups(groups, columns=columns))
    return parts


def write_sorted(storage: Storage, uri: str, table: pa.Table) -> None:
    """A table sorted by its ``order`` column, in small row groups (see ``read_order_range``)."""
    table = table.sort_by("order")
    with storage.open_write(uri) as handle:
        pq.write_table(table, handle, compression="zstd", row_group_size=_SORTED_ROW_GROUP)


def read_order_range(storage: Storage, uris: Iterable[str], low: int, high: int) -> pa.Table | None:
    """The rows with ``low <= order < high`` of order-sorted files, reading only row groups that can hold them."""
    parts = []
    for uri in uris:
        with storage.open_read(uri) as handle:
            reader = pq.ParquetFile(handle)
            column = reader.schema_arrow.get_field_index("order")
            for group in range(reader.num_row_groups):
                stats = reader.metadata.row_group(group).column(column).statistics
                if stats is not None and stats.has_min_max and (stats.max < low or stats.min >= high):
                    continue
                rows = reader.read_row_group(group)
                orders = rows["order"].to_numpy()
                parts.append(rows.filter(pa.array((orders >= low) & (orders < high))))
    return pa.concat_tables(parts) if parts else None
