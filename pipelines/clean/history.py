"""What earlier cleaning outputs kept, for an incremental run to deduplicate new documents against.

Every cleaning output keeps its share of the series' dedup history beside its data, hash-partitioned
like the global phases that read it (``dedup.partitions`` row groups per file, see ``partitions``):
- ``dedup/kept/exact/<shard>.parquet``: exact hash and document order of each kept document;
- ``dedup/kept/bands/<shard>.parquet``: the MinHash band keys of each kept document;
- ``dedup/line_counts/p<NNNN>.parquet``: for every line hash of the partition, the number of kept
  documents containing it, accumulated over this output and all outputs it was deduplicated against.
An incremental run's partition task reads only its partition of every earlier generation (new
documents never re-enter as duplicates of anything kept before) and of the latest line counts (a
line becomes recurring once enough documents of any generation contain it), so no process ever
holds the whole history. (Quality needs no history: the first generation's models and their
absolute thresholds are reused, so a small batch of new documents is judged by the same bar.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from skymoe.pipelines.clean.partitions import split_order
from skymoe.stage import StageRef, read_manifest
from skymoe.storage import Storage

KEPT_EXACT = "dedup/kept/exact"
KEPT_BANDS = "dedup/kept/bands"
LINE_COUNTS = "dedup/line_counts"


class HistoryError(ValueError):
    """An earlier output named as history is incomplete, predates the partitioned history, or was
    partitioned differently."""


def line_counts_uri(ref: StageRef, partition: int) -> str:
    return ref.path(LINE_COUNTS, f"p{partition:04d}.parquet")


@dataclass(frozen=True)
class PriorOutput:
    """One earlier generation: where it is and its input files in order (document keys name them)."""

    ref: StageRef
    shard_ids: tuple[str, ...]


@dataclass(frozen=True)
class History:
    """The earlier generations of an incremental series, oldest first; empty for a stand-alone run.
    Generation ``g`` is ``priors[g]``; this run is generation ``len(priors)``."""

    priors: tuple[PriorOutput, ...]

    @property
    def generation(self) -> int:
        return len(self.priors)

    def kept_files(self, kind: str) -> list[tuple[int, str]]:
        """(generation, file) of every earlier generation's kept-document records of ``kind``
        (``KEPT_EXACT`` or ``KEPT_BANDS``)."""
        return [(g, prior.ref.path(kind, f"{shard_id}.parquet"))
                for g, prior in enumerate(self.priors) for shard_id in prior.shard_ids]

    def line_counts(self, partition: int) -> str | None:
        """The latest accumulated line counts of one partition (they include every older generation's)."""
        return line_counts_uri(self.priors[-1].ref, partition) if self.priors else None


@dataclass(frozen=True)
class DocKeys:
    """Names documents in rejects and reasons: ``<shard>/<row>`` for this run's documents,
    ``<fingerprint>/<shard>/<row>`` for an earlier generation's."""

    shard_ids: tuple[str, ...]
    history: History

    def __call__(self, order: int) -> str:
        generation, shard, row = split_order(int(order))
        if generation == self.history.generation:
            return f"{self.shard_ids[shard]}/{row}"
        prior = self.history.priors[generation]
        return f"{prior.ref.fingerprint}/{prior.shard_ids[shard]}/{row}"


def load_history(storage: Storage, prior: Sequence[StageRef], partitions: int) -> History:
    """The earlier generations ``prior`` (oldest first)."""
    priors = []
    for ref in prior:
        manifest = read_manifest(storage, ref)
        if manifest is None:
            raise HistoryError(f"earlier cleaning output {ref.uri} is incomplete (no manifest)")
        kept_partitions = manifest.extra.get("dedup_partitions")
        if kept_partitions is None:
            raise HistoryError(f"earlier cleaning output {ref.uri} has no partitioned dedup history (made by an "
                               "older skymoe): start a new series")
        if kept_partitions != partitions:
            raise HistoryError(f"earlier cleaning output {ref.uri} was made with clean.dedup.partitions="
                               f"{kept_partitions}, this run has {partitions}: keep it the same within a series")
        priors.append(PriorOutput(ref, tuple(item["shard_id"] for item in manifest.extra["input_files"])))
    return History(tuple(priors))

