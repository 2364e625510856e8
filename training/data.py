"""Training's view of a tokenize stage: packed sequences by index, in a resumable, sharded order.

The stage writes Arrow IPC files of rows with exactly ``seq_len + 1`` token ids and lists them in
its manifest (``extra["index"]``), so a reader needs no scan: the manifest alone gives every
file's split, domain and row count. Only listed files are read; no manifest means the stage never
finished, and that is an error rather than an empty dataset.

Sample order is a pure function of ``(seed, epoch)`` and the manifest, and global sample ``k``
belongs to data-parallel rank ``k % world``. A run resumed from ``consumed_samples`` therefore
sees exactly what an uninterrupted run would have seen next, on every rank, with no state to save
beyond that count and the seed.

Training domains are up- or down-sampled by ``extra["mixture"][<lang>/<source>]["repeat"]``: each
sequence appears ``floor(repeat)`` times per epoch, plus a fixed subset (the same every epoch) of
``ceil(frac * n)`` sequences for the fractional part, chosen by a permutation seeded from the seed
and a CRC-32 of the domain key (stable across processes, unlike Python's ``hash``).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from skymoe.stage import MANIFEST, Manifest
from skymoe.storage import Storage, join

SPLITS = ("train", "validation")
_TOKEN_TYPES = {"uint16": pa.uint16(), "uint32": pa.uint32()}


class TokenReaderError(ValueError):
    """A tokenize stage that cannot be read as asked: not finished, malformed, or an empty selection."""


@dataclass(frozen=True)
class _Chunk:
    """One record batch's token ids and document starts as numpy views of the Arrow buffers (no copy)."""

    values: np.ndarray
    offsets: np.ndarray
    starts_values: np.ndarray
    starts_offsets: np.ndarray


class TokenReader:
    """Packed token sequences of one split of a finished tokenize stage, for one data-parallel rank.

    ``lang`` and ``source`` restrict the reader to those files' domains, e.g. to compute the
    validation loss per language. ``len(reader)`` is the number of samples in one epoch: the
    mixture-expanded count for ``train``, the plain sequence count for ``validation``.
    """

    def __init__(self, storage: Storage, stage_uri: str, split: str = "train", *, seed: int = 0,
                 dp_rank: int = 0, dp_world_size: int = 1, consumed_samples: int = 0,
                 lang: str | None = None, source: str | None = None):
        if split not in SPLITS:
            raise TokenReaderError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise TokenReaderError(f"dp_rank {dp_rank} is out of range for dp_world_size {dp_world_size}")
        if seed < 0 or consumed_samples < 0:
            raise TokenReaderError(f"seed ({seed}) and consumed_samples ({consumed_samples}) must be >= 0")
        self.storage = storage
        self.stage_uri = stage_uri
        self.split = split
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.consumed_samples = consumed_samples
        self.lang = lang
        self.source = source

        manifest = _read_manifest(storage, stage_uri)
        self.seq_len = int(manifest.extra["seq_len"])
        token_dtype = manifest.extra["token_dtype"]
        if token_dtype not in _TOKEN_TYPES:
            raise TokenReaderError(f"{stage_uri}: unknown token_dtype {token_dtype!r}")
        self.entries = [e for e in manifest.extra["index"] if e["split"] == split and self._selects(_domain(e))]
        if not self.entries:
            raise TokenReaderError(f"{stage_uri}: no {split} files for lang={lang!r} source={source!r}")
        self._chunks: list[_Chunk] = []
        for entry in self.entries:
            self._chunks.extend(self._open(entry, _TOKEN_TYPES[token_dtype]))
        self._starts = np.cumsum([0] + [len(c.offsets) - 1 for c in self._chunks])
        self._samples = self._epoch_samples(manifest.extra.get("mixture", {}))
        self._order: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------------ random access
    @property
    def num_sequences(self) -> int:
        """Distinct sequences in the selected files (before any mixture repeat)."""
        return int(self._starts[-1])

    @property
    def domains(self) -> list[str]:
        """The ``<lang>/<source>`` keys of the selected files, in manifest order."""
        return list(dict.fromkeys(_domain(e) for e in self.entries))

    def __len__(self) -> int:
        return len(self._samples)

    def sequence(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` ids of sequence ``index`` (files in manifest order), a read-only view."""
        chunk_index, row = self._locate(index)
        chunk = self._chunks[chunk_index]
        start = int(chunk.offsets[row])
        return chunk.values[start : start + self.seq_len + 1]

    def document_starts(self, index: int) -> np.ndarray:
        """Offsets in sequence ``index`` where a document begins (for per-document attention masks:
        position p may attend to q <= p only when no document starts in (q, p])."""
        chunk_index, row = self._locate(index)
        chunk = self._chunks[chunk_index]
        return chunk.starts_values[chunk.starts_offsets[row] : chunk.starts_offsets[row + 1]]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range ({self.num_sequences} sequences)")
        chunk_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        return chunk_index, index - int(self._starts[chunk_index])

    def sample_sequence(self, sample: int) -> int:
        """Which sequence global sample ``sample`` (counted over all epochs and ranks) is."""
        epoch, position = divmod(sample, len(self))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._order = (epoch, self._samples[rng.permutation(len(self))])
        return int(self._order[1][position])

    def sample(self, sample: int) -> np.ndarray:
        return self.sequence(self.sample_sequence(sample))

    # ------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.samples()

    def samples(self, epochs: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """This rank's ``(global sample index, ids)`` from ``consumed_samples`` on, forever or up to
        global sample ``epochs * len(self)`` (epochs count from the start, not from a resume point).

        ``consumed_samples`` advances by ``dp_world_size`` per sample yielded, so it always counts
        whole rounds of all ranks (ranks step together) and is the same value on every rank.
        """
        start = self.consumed_samples
        first = start + (self.dp_rank - start) % self.dp_world_size
        stop = None if epochs is None else epochs * len(self)
        ks = itertools.count(first, self.dp_world_size) if stop is None else range(first, stop, self.dp_world_size)
        for k in ks:
            consumed = start + ((k - first) // self.dp_world_size + 1) * self.dp_world_size
            self.consumed_samples = consumed if stop is None else min(consumed, stop)
            yield k, self.sample(k)
        if stop is not None:  # every rank has then finished: the whole range is consumed
            self.consumed_samples = max(start, stop)

    def batches(self, batch_size: int, epochs: int | None = None) -> Iterator[np.ndarray]:
        """This rank's micro-batches, ``(batch_size, seq_len + 1)`` arrays in the stage's token dtype.

        One step consumes ``batch_size * dp_world_size`` global samples. With ``epochs`` set, the
        last batch may be short rather than drop the end of the data (it matters for validation).
        """
        if batch_size < 1:
            raise TokenReaderError(f"batch_size must be >= 1, got {batch_size}")
        samples = self.samples(epochs)
        while batch := [ids for _, ids in itertools.islice(samples, batch_size)]:
            yield np.stack(batch)

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def by_domain(self) -> dict[str, "TokenReader"]:
        """One reader per ``<lang>/<source>`` of this selection (same seed and rank, from sample 0),
        for per-domain validation loss. Local files are only mapped again; S3 files are fetched again."""
        readers = {}
        for key in self.domains:
            lang, source = key.split("/", 1)
            readers[key] = TokenReader(self.storage, self.stage_uri, self.split, seed=self.seed,
                                       dp_rank=self.dp_rank, dp_world_size=self.dp_world_size,
                                       lang=lang, source=source)
        return readers

    # ------------------------------------------------------------------------ internals
    def _open(self, entry: dict[str, Any], token_type: pa.DataType) -> list[_Chunk]:
        """Record batches of one listed file as zero-copy numpy views.

        Local files are memory-mapped, so the page cache holds the data and many processes share
        it. Anything else (``s3://``) is downloaded whole into memory: simple and fine while shards
        are modest; a ranged reader would be the next step if shards grow large.
        """
        uri = file_uri(self.stage_uri, entry)
        fs, path = self.storage.fs(uri)
        try:
            if "file" in fs.protocol:
                source = pa.memory_map(path, "r")
            else:
                source = pa.BufferReader(self.storage.read_bytes(uri))
            reader = ipc.open_file(source)
        except FileNotFoundError:
            raise TokenReaderError(f"{uri}: listed in the manifest but missing") from None
        except pa.ArrowInvalid as err:
            raise TokenReaderError(f"{uri}: not an Arrow IPC file ({err})") from None
        expected = pa.list_(token_type)
        if not reader.schema.field("input_ids").type.equals(expected, check_metadata=False):
            raise TokenReaderError(f"{uri}: input_ids is {reader.schema.field('input_ids').type}, "
                                   f"the manifest says {expected}")
        chunks = []
        for i in range(reader.num_record_batches):
            column = reader.get_batch(i).column("input_ids")
            offsets = column.offsets.to_numpy(zero_copy_only=True)
            if column.null_count or column.values.null_count or np.any(np.diff(offsets) != self.seq_len + 1):
                raise TokenReaderError(f"{uri}: every row must hold exactly {self.seq_len + 1} ids")
            starts = reader.get_batch(i).column("doc_starts")
            chunks.append(_Chunk(column.values.to_numpy(zero_copy_only=True), offsets,
                                 starts.values.to_numpy(zero_copy_only=True),
                                 starts.offsets.to_numpy(zero_copy_only=True)))
        rows = sum(len(c.offsets) - 1 for c in chunks)
        if rows != entry["sequences"]:
            raise TokenReaderError(f"{uri}: {rows} rows, the manifest lists {entry['sequences']}")
        return chunks

    def _epoch_samples(self, mixture: dict[str, dict[str, Any]]) -> np.ndarray:
        """The sequence indices of one epoch, before shuffling."""
        by_domain: dict[str, list[np.ndarray]] = {}
        start = 0
        for entry in self.entries:
            by_domain.setdefault(_domain(entry), []).append(np.arange(start, start + entry["sequences"]))
            start += entry["sequences"]
        domains = {key: np.concatenate(parts) for key, parts in by_domain.items()}
        if self.split == "train":  # a mixture domain without train files is as empty as one with empty files
            domains |= {key: np.arange(0) for key in mixture if key not in domains and self._selects(key)}
        empty = sorted(key for key, sequences in domains.items() if not len(sequences))
        if empty:
            raise TokenReaderError(f"{self.stage_uri}: {self.split} domain(s) {', '.join(empty)} have no sequences")
        if self.split == "validation":
            return np.arange(self.num_sequences)
        parts = []
        for key in sorted(domains):
            if key not in mixture:
                raise TokenReaderError(f"{self.stage_uri}: train domain {key} has no mixture entry")
            repeat = float(mixture[key]["repeat"])
            if not repeat > 0:  # the cap on upsampling is the stage's config (tokenize.mixture.max_repeats)
                raise TokenReaderError(f"{self.stage_uri}: repeat {repeat} for {key} must be positive")
            sequences, whole = domains[key], math.floor(repeat)
            # Rounded first so that e.g. 0.1 * 30 (3.0000000000000004) takes 3 sequences, not 4.
            extra = math.ceil(round((repeat - whole) * len(sequences), 9))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, zlib.crc32(key.encode("utf-8"))]))
            parts += [sequences] * whole + [sequences[rng.permutation(len(sequences))[:extra]]]
        return np.concatenate(parts)

    def _selects(self, key: str) -> bool:
        lang, source = key.split("/", 1)
        return self.lang in (None, lang) and self.source in (None, source)

def file_uri(stage_uri: str, entry: dict[str, Any]) -> str:
    """Where a listed file lives: in this output, or, for files an appending run inherited, in the
    sibling output its ``output`` field names."""
    if "output" in entry:
        return join(stage_uri.rstrip("/").rsplit("/", 1)[0], entry["output"], entry["path"])
    return join(stage_uri, entry["path"])


def _domain(entry: dict[str, Any]) -> str:
    return f"{entry['lang']}/{entry['source']}"


def _read_manifest(storage: Storage, stage_uri: str) -> Manifest:
    uri = join(stage_uri, MANIFEST)
    if not storage.exists(uri):
        raise TokenReaderError(f"{stage_uri}: no {MANIFEST}; the tokenize stage has not completed there")
    manifest = Manifest.from_json(storage.read_text(uri))
    missing = [key for key in ("index", "seq_len", "token_dtype") if key not in manifest.extra]
    if missing:
        raise TokenReaderError(f"{stage_uri}: the manifest is not a tokenize stage's (no {', '.join(missing)})")
    return manifest
