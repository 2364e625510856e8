"""The clean stage's global decisions as partitioned phases: no process holds the whole corpus.

Between ``filter`` and ``apply`` the stage runs, in order (per shard = one task per input file,
per partition = one task per hash partition, driver = the stage's own process):

- ``index`` (per shard): exact hash, MinHash signature and line hashes of each kept document (the
  dedup index artifact), the exact-hash records hash-partitioned, and the count of structured documents;
- ``share`` (driver): the counts summed into the probability that keeps structured documents at
  their configured share (each document's draw from a hash of its id, so any task decides alike);
- ``exact`` (per partition): structured documents over the share left out, exact-hash groups, first
  in input order wins;
- ``bands`` (per shard): the MinHash band keys of documents still alive, partitioned by bucket;
- ``near`` (per partition): candidate pairs, each bucket member paired with the bucket's first;
- ``clusters`` (driver): connected components over the candidate pairs only (memory grows with
  near-duplicate pairs, not documents), written as one drop list sorted by document order;
- ``settle`` (per shard): the shard's decisions, the line-hash counts of its surviving documents,
  and its kept-document records for later generations, all partitioned;
- ``lines`` (per partition): line counts summed (with the earlier generations'), recurring lines.

Every task writes its files, then its done-record: a crash resumes with the unfinished tasks.
Earlier generations of an incremental series enter each partition task as their own records of
that partition (``history``). Decisions are the single-process algorithm's: documents in input
order, earlier generations first, so "first occurrence wins" is "smallest document order wins".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skymoe.pipelines.clean import dedup
from skymoe.pipelines.clean.history import KEPT_BANDS, KEPT_EXACT, DocKeys, History, line_counts_uri
from skymoe.pipelines.clean.partitions import (
    doc_order,
    generation_of,
    PartitionedWriter,
    partitioned_writer,
    read_order_range,
    read_partition,
    shard_range,
    with_generation,
    write_sorted,
)
from skymoe.pipelines.clean.readers import InputShard
from skymoe.pipelines.clean.structured import keep_probability, share_draws
from skymoe.pipelines.clean.tables import iter_batches, read_table, row_writer, write_table
from skymoe.config import CleanConfig
from skymoe.stage import DoneRecords, StageRef
from skymoe.storage import Storage

INDEX = "dedup_index"
EXACT_KEYS = "dedup/exact_keys"
EXACT_DROPS = "dedup/exact_drops"
BAND_KEYS = "dedup/band_keys"
NEAR_PAIRS = "dedup/near_pairs"
NEAR_DROPS = "dedup/near_drops.parquet"
DECISIONS = "dedup/decisions"
LINE_KEYS = "dedup/line_keys"
RECURRING = "dedup/recurring"
# Documents per chunk of a partitioned per-shard file (each chunk is one row group per partition).
CHUNK_DOCS = 65536

INDEX_SCHEMA = pa.schema([
    ("row", pa.int32()), ("lang", pa.string()), ("share_draw", pa.float64()), ("exact_hash", pa.uint64()),
    ("minhash", pa.list_(pa.uint32())), ("line_hashes", pa.list_(pa.uint64())),
])
EXACT_SCHEMA = pa.schema([("exact_hash", pa.uint64()), ("order", pa.int64()), ("share_draw", pa.float64())])
KEPT_EXACT_SCHEMA = pa.schema([("exact_hash", pa.uint64()), ("order", pa.int64())])
DROP_SCHEMA = pa.schema([("order", pa.int64()), ("by", pa.int64())])
PAIR_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])
DECISION_SCHEMA = pa.schema([("row", pa.int64()), ("step", pa.string()), ("reason", pa.string())])
LINE_SCHEMA = pa.schema([("line_hash", pa.uint64()), ("docs", pa.int64())])


def band_schema(rows: int) -> pa.Schema:
    return pa.schema([("band", pa.uint16()), ("key", pa.binary(4 * rows)), ("order", pa.int64())])


@dataclass(frozen=True)
class DedupRun:
    """What every task of the global phases needs (picklable: it travels to executor workers)."""

    config: CleanConfig
    storage: Storage
    ref: StageRef
    shards: list[InputShard]
    history: History
    structured_keep: float = 1.0  # known after ``share``: the probability a structured document is kept

    @property
    def partitions(self) -> int:
        return self.config.dedup.partitions

    def shard_file(self, folder: str, index: int) -> str:
        return self.ref.path(folder, f"{self.shards[index].shard_id}.parquet")

    def shard_files(self, folder: str) -> list[str]:
        return [self.shard_file(folder, i) for i in range(len(self.shards))]

    def partition_file(self, folder: str, partition: int, suffix: str = ".parquet") -> str:
        return self.ref.path(folder, f"p{partition:04d}{suffix}")

    def exact_drop_files(self) -> list[str]:
        return [self.partition_file(EXACT_DROPS, p) for p in range(self.partitions)] if self.config.dedup.exact else []

    def near_drop_files(self) -> list[str]:
        return [self.ref.path(NEAR_DROPS)] if self.config.dedup.minhash.enabled else []

    def orders(self, index: int, rows: np.ndarray) -> np.ndarray:
        return doc_order(self.history.generation, index, rows)

    @property
    def keys(self) -> DocKeys:
        return DocKeys(tuple(s.shard_id for s in self.shards), self.history)

    def over_share(self, draws: np.ndarray) -> np.ndarray:
        """Which documents are structured ones left out to keep their share: a draw (prose has none,
        stored as null, read as NaN) at or above the keep probability."""
        return np.nan_to_num(draws, nan=-1.0) >= self.structured_keep

    def dropped_rows(self, files: list[str], index: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of shard ``index`` in order-sorted drop lists, and the document each duplicates."""
        low, high = shard_range(self.history.generation, index)
        table = read_order_range(self.storage, files, low, high)
        if table is None or not table.num_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return table["order"].to_numpy() - low, table["by"].to_numpy()


def _signatures(column: pa.ChunkedArray, width: int) -> np.ndarray:
    return pc.list_flatten(column).to_numpy().astype(np.uint32).reshape(len(column), width)


def _key_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """Band keys (fixed-size binary) back to their (documents x rows) uint32 values."""
    keys = column.combine_chunks()
    width = keys.type.byte_width
    data = np.frombuffer(keys.buffers()[1], dtype=np.uint8)[keys.offset * width : (keys.offset + len(keys)) * width]
    return data.view(np.uint32).reshape(len(keys), width // 4)


def _band_table(run: DedupRun, signatures: np.ndarray, orders: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    mh = run.config.dedup.minhash
    band, keys, spread = dedup.band_records(signatures, mh.num_bands, mh.rows_per_band)
    width = 4 * mh.rows_per_band
    key_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(band), [None, pa.py_buffer(keys.tobytes())])
    table = pa.table([pa.array(band), key_array, pa.array(np.repeat(orders, mh.num_bands))],
                     schema=band_schema(mh.rows_per_band))
    return table, (spread % np.uint64(run.partitions)).astype(np.int64)


class _Chunks:
    """Records gathered until a chunk is full, then written as one set of partition row groups:
    a shard's partitioned file is written as the shard is read."""

    def __init__(self, writer: PartitionedWriter):
        self.writer = writer
        self.tables: list[pa.Table] = []
        self.partitions: list[np.ndarray] = []
        self.docs = 0

    def add(self, table: pa.Table, partition: np.ndarray, docs: int) -> None:
        self.tables.append(table)
        self.partitions.append(partition)
        self.docs += docs
        if self.docs >= CHUNK_DOCS:
            self.flush()

    def flush(self) -> None:
        if self.tables:
            self.writer.write(pa.concat_tables(self.tables), np.concatenate(self.partitions))
            self.tables, self.partitions, self.docs = [], [], 0


def _hash_partition(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of an exact or line hash (xxh3 values: already uniform)."""
    return (hashes % np.uint64(partitions)).astype(np.int64)


# ------------------------------------------------------------------------------ per-shard phases
class IndexShard:
    """``index``: the dedup index of a shard's kept documents, its exact-hash records, and how many
    of its documents are structured text."""

    def __init__(self, run: DedupRun):
        self.run = run
        mh = run.config.dedup.minhash
        self.hasher = dedup.MinHasher(mh.num_bands, mh.rows_per_band, mh.ngram, mh.seed)

    def __call__(self, index: int) -> None:
        run, storage = self.run, self.run.storage
        shard = run.shards[index]
        min_chars = run.config.dedup.recurring.min_line_chars
        structured = 0
        with row_writer(storage, run.shard_file(INDEX, index), INDEX_SCHEMA) as rows, \
                partitioned_writer(storage, run.shard_file(EXACT_KEYS, index), EXACT_SCHEMA, run.partitions) as out:
            exact = _Chunks(out)
            filtered = run.ref.path("filtered", f"{shard.shard_id}.parquet")
            for first, batch in iter_batches(storage, filtered, ["id", "text", "lang", "structured"]):
                langs = batch["lang"].to_pylist()
                is_structured = batch["structured"].is_valid().to_numpy(zero_copy_only=False)
                draws = np.full(batch.num_rows, np.nan)  # prose has no draw: only structured ids are hashed
                draws[is_structured] = share_draws(batch["id"].filter(batch["structured"].is_valid()).to_pylist())
                structured += int(is_structured.sum())
                hashes = []
                for offset, text in enumerate(batch["text"].to_pylist()):
                    hashes.append(dedup.normalized_hash(text))
                    rows.add({"row": first + offset, "lang": langs[offset],
                              "share_draw": None if np.isnan(draws[offset]) else float(draws[offset]),
                              "exact_hash": hashes[-1],
                              "minhash": self.hasher.signature(text, langs[offset]).tolist(),
                              "line_hashes": dedup.line_hashes(text, min_chars).tolist()})
                hashes = np.array(hashes, dtype=np.uint64)
                exact.add(pa.table([hashes, run.orders(index, np.arange(first, first + batch.num_rows)),
                                    pa.array(draws, from_pandas=True)], schema=EXACT_SCHEMA),
                          _hash_partition(hashes, run.partitions), batch.num_rows)
            exact.flush()
        DoneRecords(storage, run.ref, "index").mark(shard.shard_id, {"docs": rows.count, "structured": structured})


def _over_share(run: DedupRun, batch: pa.Table) -> np.ndarray:
    """Which documents of a batch with ``share_draw`` are structured ones left out to keep their share."""
    return run.over_share(batch["share_draw"].to_numpy(zero_copy_only=False).astype(np.float64))


class BandShard:
    """``bands``: the band keys of the shard's documents within the structured share and not exact duplicates."""

    def __init__(self, run: DedupRun):
        self.run = run

    def __call__(self, index: int) -> None:
        run = self.run
        exact_rows, _ = run.dropped_rows(run.exact_drop_files(), index)
        width = run.config.dedup.minhash.num_bands * run.config.dedup.minhash.rows_per_band
        docs = 0
        with partitioned_writer(run.storage, run.shard_file(BAND_KEYS, index),
                                band_schema(run.config.dedup.minhash.rows_per_band), run.partitions) as out:
            bands = _Chunks(out)
            for first, batch in iter_batches(run.storage, run.shard_file(INDEX, index),
                                             ["share_draw", "minhash"]):
                rows = np.arange(first, first + batch.num_rows)
                alive = ~_over_share(run, batch) & ~np.isin(rows, exact_rows)
                table, partition = _band_table(run, _signatures(batch["minhash"], width)[alive],
                                               run.orders(index, rows[alive]))
                bands.add(table, partition, int(alive.sum()))
                docs += int(alive.sum())
            bands.flush()
        DoneRecords(run.storage, run.ref, "bands").mark(run.shards[index].shard_id, {"docs": docs})


class SettleShard:
    """``settle``: the shard's final decisions, the line counts of its surviving documents, and the
    records of its kept documents that later generations deduplicate against."""

    def __init__(self, run: DedupRun):
        self.run = run

    def __call__(self, index: int) -> None:
        run, storage = self.run, self.run.storage
        mh = run.config.dedup.minhash
        exact_rows, exact_by = run.dropped_rows(run.exact_drop_files(), index)
        near_rows, near_by = run.dropped_rows(run.near_drop_files(), index)
        keys = run.keys
        decided = {int(row): ("exact_dedup", f"duplicate_of: {keys(by)}") for row, by in zip(exact_rows, exact_by)}
        decided |= {int(row): ("near_dedup", f"near_duplicate_of: {keys(by)}") for row, by in zip(near_rows, near_by)}
        line_hashes: list[np.ndarray] = []
        with partitioned_writer(storage, run.shard_file(KEPT_EXACT, index), KEPT_EXACT_SCHEMA, run.partitions) as \
                kept_exact_file, partitioned_writer(storage, run.shard_file(KEPT_BANDS, index),
                                                    band_schema(mh.rows_per_band), run.partitions) as kept_bands_file:
            kept_exact, kept_bands = _Chunks(kept_exact_file), _Chunks(kept_bands_file)
            for first, batch in iter_batches(storage, run.shard_file(INDEX, index)):
                rows = np.arange(first, first + batch.num_rows)
                over = _over_share(run, batch)
                decided |= {int(row): ("structured_text", "over_share") for row in rows[over]}
                alive = ~over & ~np.isin(rows, exact_rows) & ~np.isin(rows, near_rows)
                line_hashes.append(pc.list_flatten(batch["line_hashes"].filter(pa.array(alive))).to_numpy())
                local = doc_order(0, index, rows[alive])  # stored as generation 0, placed when read
                hashes = batch["exact_hash"].to_numpy()[alive]
                kept_exact.add(pa.table([hashes, local], schema=KEPT_EXACT_SCHEMA),
                               _hash_partition(hashes, run.partitions), len(local))
                kept_bands.add(*_band_table(run, _signatures(batch["minhash"], mh.num_bands * mh.rows_per_band)[alive],
                                            local), len(local))
            kept_exact.flush()
            kept_bands.flush()
        hashes, docs = np.unique(np.concatenate(line_hashes or [np.zeros(0, np.uint64)]), return_counts=True)
        with partitioned_writer(storage, run.shard_file(LINE_KEYS, index), LINE_SCHEMA, run.partitions) as out:
            out.write(pa.table([hashes, docs.astype(np.int64)], schema=LINE_SCHEMA),
                      _hash_partition(hashes, run.partitions))
        write_table(storage, run.shard_file(DECISIONS, index), pa.table({
            "row": sorted(decided), "step": [decided[r][0] for r in sorted(decided)],
            "reason": [decided[r][1] for r in sorted(decided)],
        }, schema=DECISION_SCHEMA))
        DoneRecords(storage, run.ref, "settle").mark(run.shards[index].shard_id, {"decided": len(decided)})


# ------------------------------------------------------------------------------ per-partition phases
class ExactPartition:
    """``exact``: one hash partition's exact-duplicate groups; the smallest document order wins (an
    earlier generation's kept document, else the first in input order)."""

    def __init__(self, run: DedupRun):
        self.run = run

    def __call__(self, partition: int) -> None:
        run = self.run
        hashes, orders = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
        for generation, uri in run.history.kept_files(KEPT_EXACT):
            for table in read_partition(run.storage, [uri], partition, run.partitions):
                hashes.append(table["exact_hash"].to_numpy())
                orders.append(with_generation(table["order"].to_numpy(), generation))
        for table in read_partition(run.storage, run.shard_files(EXACT_KEYS), partition, run.partitions):
            alive = ~_over_share(run, table)
            hashes.append(table["exact_hash"].to_numpy()[alive])
            orders.append(table["order"].to_numpy()[alive])
        hashes, orders = np.concatenate(hashes), np.concatenate(orders)
        sort = np.lexsort((orders, hashes))
        hashes, orders = hashes[sort], orders[sort]
        starts = np.r_[True, hashes[1:] != hashes[:-1]] if len(hashes) else np.zeros(0, bool)
        first = orders[np.maximum.accumulate(np.where(starts, np.arange(len(orders)), 0))] if len(orders) else orders
        duplicate = ~starts & (generation_of(orders) == run.history.generation)
        write_sorted(run.storage, run.partition_file(EXACT_DROPS, partition),
                     pa.table([orders[duplicate], first[duplicate]], schema=DROP_SCHEMA))
        DoneRecords(run.storage, run.ref, "exact").mark(f"p{partition:04d}", {
            "dropped": int(duplicate.sum()),
            "of_earlier": int((duplicate & (generation_of(first) < run.history.generation)).sum()),
        })


class NearPartition:
    """``near``: candidate near-duplicate pairs of one partition of MinHash buckets."""

    def __init__(self, run: DedupRun):
        self.run = run

    def __call__(self, partition: int) -> None:
        run = self.run
        bands, keys, orders = [], [], []

        def take(table: pa.Table, generation: int | None) -> None:
            bands.append(table["band"].to_numpy())
            keys.append(_key_matrix(table["key"]))
            order = table["order"].to_numpy()
            orders.append(order if generation is None else with_generation(order, generation))

        for generation, uri in run.history.kept_files(KEPT_BANDS):
            for table in read_partition(run.storage, [uri], partition, run.partitions):
                take(table, generation)
        for table in read_partition(run.storage, run.shard_files(BAND_KEYS), partition, run.partitions):
            take(table, None)
        rows = run.config.dedup.minhash.rows_per_band
        a, b = dedup.bucket_pairs(np.concatenate(bands or [np.zeros(0, np.uint16)]),
                                  np.concatenate(keys or [np.zeros((0, rows), np.uint32)]),
                                  np.concatenate(orders or [np.zeros(0, np.int64)]))
        write_table(run.storage, run.partition_file(NEAR_PAIRS, partition), pa.table([a, b], schema=PAIR_SCHEMA))
        DoneRecords(run.storage, run.ref, "near").mark(f"p{partition:04d}", {"pairs": len(a)})


class LinePartition:
    """``lines``: one partition of line hashes: documents per line, summed over shards and the
    earlier generations, and the lines that recur often enough to be cut."""

    def __init__(self, run: DedupRun):
        self.run = run

    def __call__(self, partition: int) -> None:
        run = self.run
        parts = read_partition(run.storage, run.shard_files(LINE_KEYS), partition, run.partitions)
        earlier = run.history.line_counts(partition)
        if earlier is not None:
            parts.append(read_table(run.storage, earlier))
        table = pa.concat_tables(parts) if parts else LINE_SCHEMA.empty_table()
        hashes, inverse = np.unique(table["line_hash"].to_numpy(), return_inverse=True)
        docs = np.bincount(inverse, weights=table["docs"].to_numpy(), minlength=len(hashes)).astype(np.int64)
        write_table(run.storage, line_counts_uri(run.ref, partition), pa.table([hashes, docs], schema=LINE_SCHEMA))
        recurring = run.config.dedup.recurring
        lines = hashes[docs >= recurring.min_docs] if recurring.enabled else np.zeros(0, np.uint64)
        write_table(run.storage, run.partition_file(RECURRING, partition),
                    pa.table({"line_hash": lines}, schema=pa.schema([("line_hash", pa.uint64())])))
        DoneRecords(run.storage, run.ref, "lines").mark(f"p{partition:04d}", {"lines": len(hashes),
                                                                              "recurring": len(lines)})


# ------------------------------------------------------------------------------ driver steps
def structured_share(run: DedupRun) -> dict:
    """``share``: the probability that keeps structured documents at most ``structured.max_share`` of
    this generation's documents reaching dedup, from the ``index`` phase's counts."""
    records = DoneRecords(run.storage, run.ref, "index").all().values()
    docs, structured = sum(r["docs"] for r in records), sum(r["structured"] for r in records)
    settings = run.config.structured
    keep = keep_probability(structured, docs - structured, settings.max_share) if settings.enabled else 1.0
    return {"docs": docs, "structured_docs": structured, "max_share": settings.max_share, "keep_probability": keep}



def near_clusters(run: DedupRun) -> dict:
    """``clusters``: connected components over every partition's candidate pairs; each document of
    this run that is not its component's first goes on the near-duplicate drop list."""
    tables = [read_table(run.storage, run.partition_file(NEAR_PAIRS, p)) for p in range(run.partitions)]
    pairs = pa.concat_tables(tables)
    nodes, roots = dedup.cluster_roots(pairs["a"].to_numpy(), pairs["b"].to_numpy())
    duplicate = (nodes != roots) & (generation_of(nodes) == run.history.generation)
    write_sorted(run.storage, run.ref.path(NEAR_DROPS), pa.table([nodes[duplicate], roots[duplicate]],
                                                                  schema=DROP_SCHEMA))
    return {"pairs": pairs.num_rows, "near_duplicates": int(duplicate.sum()),
            "of_earlier": int((duplicate & (generation_of(roots) < run.history.generation)).sum())}


def recurring_lines(run: DedupRun) -> set[int]:
    """Every partition's recurring lines: what ``apply`` cuts (a small set: lines shared by many documents)."""
    return {value for p in range(run.partitions)
            for value in read_table(run.storage, run.partition_file(RECURRING, p))["line_hash"].to_pylist()}
