"""The tokenize stage: cleaned Parquet shards -> tokenizer + packed Arrow shards + index, under
the stage contract (``<root>/tokenize/<fingerprint>/``, done-records per unit, manifest last).

Phases, each resumable:
1. ``tokenizer`` - train a byte-level BPE on the cleaned documents, or copy the given one;
2. ``encode`` (per cleaned shard, a picklable :class:`EncodeShard` task) - split documents into
   train / validation by a hash of the document, shuffle the training documents under the seed,
   encode, pack per language, and write Arrow IPC files (``train/`` and ``validation/``). It runs
   on ``tokenize.executor`` (datatrove, Beam or Ray, as the clean stage's per-shard phases; the
   same bytes every way), in this process when that would be a single local worker;
3. the manifest: the file index (sequences and tokens per file, split, language, source) and the
   mixture plan (repeat factor and realised tokens per language and source).

An appending run (``base``: an earlier tokenize output) encodes only its own cleaned shards with
the base's tokenizer; its manifest lists the base's files, untouched where they are (each such
entry names its folder in ``output``), followed by the new ones, so training reads one index.
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import xxhash
from tokenizers import Tokenizer

from skymoe.pipelines.tokenize.chart import bar_chart_png
from skymoe.pipelines.tokenize.mixture import repeat_factors
from skymoe.pipelines.tokenize.packing import PackedRows, pack, rows_table
from skymoe.pipelines.tokenize.tokenizer import (
    TokenizerError,
    TokenizerFolder,
    check_token_dtype,
    load_tokenizer_folder,
    save_tokenizer,
    smallest_token_dtype,
    tokenizer_files,
    train_tokenizer,
)
from skymoe.config import ExecutorConfig, PipelineConfig, TokenizeConfig, describe_path
from skymoe.progress import Progress
from skymoe.stage import (Continuation, DoneRecords, Plan, Stage, StageOutput, StageRef, folder_entries,
                          read_manifest)
from skymoe.storage import Storage

SPLITS = ("train", "validation")
# Rows per Parquet record batch read: a cleaned shard becomes Python strings a batch at a time, so
# neither its file's bytes nor its whole Arrow table is ever held beside them.
READ_ROWS = 1024
log = logging.getLogger("skymoe.tokenize")


class TokenizeError(ValueError):
    """The stage cannot start: no complete cleaning output, or a corpus too small to pack."""


@dataclass(frozen=True)
class TokenizeUnit:
    """One cleaned shard: the unit of work and of resume."""

    unit_id: str
    uri: str
    source: str


@dataclass(frozen=True)
class TokenizeWork:
    units: list[TokenizeUnit]
    base: StageRef | None = None  # the output this one appends to


class TokenizeStage(Stage):
    """Cleaned shards -> a tokenizer and packed Arrow shards with their index and mixture plan."""

    name = "tokenize"
    upstream = ("clean",)
    section = "tokenize"
    code = tuple(f"skymoe.pipelines.tokenize.{module}" for module in ("stage", "tokenizer", "packing", "mixture"))
    libraries = ("tokenizers", "pyarrow")

    def check(self, config: PipelineConfig, storage: Storage) -> None:
        """A given tokenizer is loaded and its special tokens checked, before any stage works."""
        try:
            _settings(config.tokenize, storage)
            if config.tokenize.tokenizer.path:
                load_tokenizer_folder(storage, config.tokenize.tokenizer.path)
        except (TokenizeError, TokenizerError) as err:
            if not config.tokenize.tokenizer.path:
                raise
            where = describe_path(config, "tokenize.tokenizer.path")
            raise TokenizeError(f"tokenize.tokenizer.path: {err}; written as {where}") from None

    def plan(self, config: PipelineConfig, storage: Storage, upstream: Mapping[str, StageRef],
             continues: Continuation | None = None) -> list[Plan]:
        """The units to encode and the fingerprint; fails before any work when cleaning (or the
        output a continuing run appends to) is incomplete."""
        clean_ref = upstream["clean"]
        clean = read_manifest(storage, clean_ref)
        if clean is None:
            raise TokenizeError(f"no complete cleaning output at {clean_ref.uri} (manifest.json missing)")
        units = [TokenizeUnit(Path(entry["path"]).stem, clean_ref.path(entry["path"]),
                              _source_of(clean.extra["input_files"], entry["input"]))
                 for entry in clean.shards if entry["docs"] > 0]
        inputs = {"clean": clean_ref.fingerprint}
        base = continues.previous["tokenize"] if continues else None
        if base is not None:
            if read_manifest(storage, base) is None:
                raise TokenizeError(f"cannot append to {base.uri}: it has no manifest.json")
            inputs["base"] = base.fingerprint  # its tokenizer wins over the tokenizer settings
        return [self.make_plan(config, _settings(config.tokenize, storage), inputs, upstream={"clean": clean_ref},
                               work=TokenizeWork(units, base))]

    def run(self, plan: Plan, storage: Storage) -> StageOutput:
        return _run(plan.config.tokenize, storage, plan.ref, plan.work)


def _settings(config: TokenizeConfig, storage: Storage) -> dict:
    """The config as it changes the shards: a given tokenizer by content; a token dtype too narrow
    for the vocabulary fails here, before a tokenizer is trained."""
    if config.token_dtype and not config.tokenizer.path:
        check_token_dtype(config.token_dtype, config.tokenizer.vocab_size)
    settings = config.model_dump(mode="json", exclude={"encode_batch", "executor"})  # the same bytes either way
    if config.tokenizer.path:
        files = tokenizer_files(storage, config.tokenizer.path)
        if not storage.exists(files[0]):
            raise TokenizeError(f"no tokenizer at {files[0]}")
        settings["tokenizer"]["path"] = [storage.checksum(uri) for uri in files]  # its special tokens too
    return settings


def _source_of(inputs: list[dict], input_uri: str) -> str:
    return next(item["source"] for item in inputs if item["uri"] == input_uri)


def _run(config: TokenizeConfig, storage: Storage, ref: StageRef, work: TokenizeWork) -> StageOutput:
    started = time.monotonic()
    tokenizer_uri = ref.path("tokenizer")
    done = DoneRecords(storage, ref, "tokenizer")
    if done.get("tokenizer") is None:
        # An appending run uses its base's tokenizer: appended ids must mean what the base's ids mean.
        given = work.base.path("tokenizer") if work.base is not None else config.tokenizer.path
        if given:
            source = load_tokenizer_folder(storage, given)
            tokenizer, tokenizer_config = source.tokenizer, source.config
        else:
            tokenizer = train_tokenizer(_training_texts(storage, work.units, config), config.tokenizer.vocab_size,
                                        config.tokenizer.min_frequency)
            tokenizer_config = None
        save_tokenizer(tokenizer, storage, tokenizer_uri, tokenizer_config)
        done.mark("tokenizer", {"vocab_size": tokenizer.get_vocab_size()})
        log.info("tokenize: tokenizer with %d ids at %s", tokenizer.get_vocab_size(), tokenizer_uri)
    tokenizer = load_tokenizer_folder(storage, tokenizer_uri)
    vocab_size = tokenizer.tokenizer.get_vocab_size()
    dtype = check_token_dtype(config.token_dtype, vocab_size) if config.token_dtype else smallest_token_dtype(vocab_size)
    timings = {"tokenizer": round(time.monotonic() - started, 3)}

    records = _encode_phase(EncodeShard(config, storage, ref, work.units, dtype, tokenizer), config.executor)
    timings["encode"] = round(time.monotonic() - started - timings["tokenizer"], 3)

    output = _output(config, storage, ref, work, records, vocab_size, dtype, timings)
    log.info("tokenize: %d training sequences", output.counts["train_sequences"])
    return output


def _local_workers(executor: ExecutorConfig, pending: int) -> int:
    """The worker processes datatrove's executor uses for ``pending`` shards (as ``map_shards`` decides):
    ``workers``, fewer when there are under ``min_shards_per_worker`` shards each; 1 runs in this process."""
    return max(1, min(executor.workers, pending // executor.min_shards_per_worker))


def _encode_phase(task: EncodeShard, executor: ExecutorConfig) -> dict[str, dict]:
    """Run ``task`` for every unit without a done-record; returns every unit's record.

    Beam and Ray, and datatrove with more than one worker, get the pending units through
    ``map_shards``. One local datatrove worker would run them in this process anyway: they run
    here directly, without importing datatrove (about 0.5 s) or its executor's per-task deep copy
    and log files (tens of ms per unit), which together took longer than encoding the benchmark's
    3 MB corpus.
    """
    records = DoneRecords(task.storage, task.ref, "encode")
    done = records.ids()
    pending = [i for i, unit in enumerate(task.units) if unit.unit_id not in done]
    if pending:
        progress = Progress("tokenize/encode", len(pending), "shards", log)
        if executor.kind == "datatrove" and _local_workers(executor, len(pending)) == 1:
            log.info("tokenize/encode: %d of %d shards to do, in this process", len(pending), len(task.units))
            for index in pending:
                task(index)
                progress.update()
        else:
            from skymoe.pipelines.clean.executors import map_shards

            log.info("tokenize/encode: %d of %d shards to do (%s executor)", len(pending), len(task.units),
                     executor.kind)
            with progress.watching(lambda: len(records.ids() - done)):
                map_shards(executor, task, pending, "tokenize-encode")
            progress.done = len(records.ids() - done)
        progress.close()
    finished = records.all()
    missing = [unit.unit_id for unit in task.units if unit.unit_id not in finished]
    if missing:
        raise RuntimeError(f"tokenize/encode: shards {missing} did not finish")
    return finished


def _plots(storage: Storage, ref: StageRef, mixture: dict[str, dict]) -> list[str]:
    """Training tokens per domain as the corpus has them and as the mixture uses them per epoch."""
    values = {f"{domain} (corpus)": plan["tokens"] for domain, plan in mixture.items()}
    values |= {f"{domain} (x{plan['repeat']:.2g} per epoch)": plan["realised_tokens"] for domain, plan in mixture.items()}
    storage.write_bytes(ref.path("report", "mixture.png"), bar_chart_png("tokenize: training tokens", values, "tokens"))
    return ["report/mixture.png"]


def _record_batches(storage: Storage, unit: TokenizeUnit, columns: list[str]):
    """A cleaned shard's columns a record batch at a time, streamed from storage.

    ``ParquetFile``, not ``pq.read_table``: read_table imports pyarrow.dataset and pandas (~0.25 s per process).
    """
    with storage.open_read(unit.uri) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=READ_ROWS, columns=columns)


def _training_texts(storage: Storage, units: list[TokenizeUnit], config: TokenizeConfig):
    """Cleaned texts in shard order, up to ``train_docs`` (the tokenizer's training data), read a
    record batch at a time: no more of a shard is read than is used."""
    remaining = config.tokenizer.train_docs
    for unit in units:
        for batch in _record_batches(storage, unit, ["text"]):
            for text in batch.column("text").to_pylist()[:remaining]:
                yield text
                remaining -= 1
            if remaining <= 0:
                return


def is_validation(doc_id: str, text: str, permille: int) -> bool:
    """Held out by a hash of the document itself, so the split never depends on order or shards."""
    return xxhash.xxh64_intdigest(f"{doc_id}\x00{text}".encode("utf-8")) % 1000 < permille


# Per process: the tokenizer an encode task loaded last (its URI, the tokenizer), so a worker that runs
# many units loads it once.
_LOADED: dict[str, TokenizerFolder] = {}


class EncodeShard:
    """The encode phase for one cleaned shard (``task(index)``): the picklable task every executor
    runs. It writes the shard's Arrow files, then its done-record with each file's size and checksum
    (computed where the file was written, not again by the stage's process)."""

    def __init__(self, config: TokenizeConfig, storage: Storage, ref: StageRef, units: list[TokenizeUnit],
                 dtype: np.dtype, tokenizer: TokenizerFolder | None = None):
        self.config, self.storage, self.ref, self.units, self.dtype = config, storage, ref, units, dtype
        self.tokenizer_uri = ref.path("tokenizer")
        self._tokenizer = tokenizer

    def __getstate__(self) -> dict:
        # A pickled (or deep-copied) Tokenizer is its JSON, which drops encode_special_tokens: a literal
        # "</s>" in a page would become an EOS id. Each process loads it with load_tokenizer_folder instead.
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> TokenizerFolder:
        if self._tokenizer is None:
            if self.tokenizer_uri not in _LOADED:
                _LOADED.clear()
                _LOADED[self.tokenizer_uri] = load_tokenizer_folder(self.storage, self.tokenizer_uri)
            self._tokenizer = _LOADED[self.tokenizer_uri]
        return self._tokenizer

    def __call__(self, index: int) -> None:
        unit = self.units[index]
        record = _encode_unit(unit, self.config, self.storage, self.ref, self.tokenizer, self.dtype)
        record["stored"] = {entry["path"]: {"bytes": self.storage.size(self.ref.path(entry["path"])),
                                            "checksum": self.storage.checksum(self.ref.path(entry["path"]))}
                            for entry in record["files"]}
        DoneRecords(self.storage, self.ref, "encode").mark(unit.unit_id, record)


def _read_unit(storage: Storage, unit: TokenizeUnit, permille: int) -> tuple[list[str], list[str], list[bool]]:
    """A cleaned shard's texts, languages and held-out flags, read a record batch at a time (document
    ids are needed only for the held-out hash, and are not kept)."""
    texts: list[str] = []
    langs: list[str] = []
    held_out: list[bool] = []
    for batch in _record_batches(storage, unit, ["id", "text", "lang"]):
        batch_texts = batch.column("text").to_pylist()
        held_out += [is_validation(doc_id, text, permille)
                     for doc_id, text in zip(batch.column("id").to_pylist(), batch_texts)]
        texts += batch_texts
        langs += batch.column("lang").to_pylist()
    return texts, langs, held_out


def _encode_unit(unit: TokenizeUnit, config: TokenizeConfig, storage: Storage, ref: StageRef,
                 tokenizer: TokenizerFolder, dtype: np.dtype) -> dict:
    """Encode one cleaned shard and write its Arrow files; returns the unit's done-record."""
    texts, langs, held_out = _read_unit(storage, unit, config.validation_permille)
    # Training documents in a seeded order (the seed and the unit id, never Python's hash()).
    order = np.random.default_rng([config.seed, zlib.crc32(unit.unit_id.encode())]).permutation(len(texts))
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for i in order:
        if not texts[i]:
            counts["empty_docs"] += 1  # nothing to learn from; an EOS alone would only add noise
            continue
        groups[("validation" if held_out[i] else "train", langs[i])].append(int(i))
    files = []
    for (split, lang), ids, lengths in _encoded(tokenizer.tokenizer, texts, sorted(groups.items()), config.encode_batch,
                                                dtype):
        # Long documents simply continue over several rows; counted so the spread is visible.
        counts["docs_longer_than_a_sequence"] += int((lengths >= config.seq_len).sum())
        rows = pack(ids, lengths, tokenizer.eos_id, config.seq_len + 1, dtype)
        counts[f"{split}_docs"] += len(lengths)
        counts[f"{split}_dropped_tokens"] += rows.dropped_tokens
        files += _write_rows(storage, ref, unit, split, lang, rows, config.sequences_per_file)
    return {"files": files, "counts": dict(counts)}


def _encoded(tokenizer: Tokenizer, texts: list[str], groups: list[tuple[tuple[str, str], list[int]]],
             batch_size: int, dtype: np.dtype) -> Iterator[tuple[tuple[str, str], np.ndarray, np.ndarray]]:
    """Each group's documents (``texts`` by index) encoded, group after group: the key, the documents'
    ids one after another, and how many ids each has.

    The groups' documents are encoded as one run of batches of ``batch_size``, so a small group (a
    language's held-out documents) does not make a small batch of its own, which leaves cores idle;
    a document's ids do not depend on its batch. ``encode_batch_fast``: the ids without character
    offsets, which packing never uses.
    """
    order = [i for _, members in groups for i in members]
    ids: list[np.ndarray] = []  # encoded and not yet handed out, per batch
    lengths: list[np.ndarray] = []
    handed = encoded = 0  # documents handed out, documents encoded
    for (key, _), end in zip(groups, itertools.accumulate(len(members) for _, members in groups)):
        while encoded < end:
            encodings = tokenizer.encode_batch_fast([texts[i] for i in order[encoded : encoded + batch_size]])
            sizes = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
            ids.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype,
                                   count=int(sizes.sum())))
            lengths.append(sizes)
            encoded += len(encodings)
        all_ids, all_lengths = np.concatenate(ids), np.concatenate(lengths)
        cut = int(all_lengths[: end - handed].sum())
        yield key, all_ids[:cut], all_lengths[: end - handed]
        ids, lengths, handed = [all_ids[cut:]], [all_lengths[end - handed :]], end


def _write_rows(storage: Storage, ref: StageRef, unit: TokenizeUnit, split: str, lang: str, rows: PackedRows,
                per_file: int) -> list[dict]:
    written = []
    for part, start in enumerate(range(0, len(rows.ids), per_file)):
        stop = min(start + per_file, len(rows.ids))
        table = rows_table(rows, lang, unit.source, start, stop)
        path = f"{split}/{unit.unit_id}-{lang}-{part:04d}.arrow"
        with storage.open_write(ref.path(path)) as handle, ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        written.append({"path": path, "split": split, "lang": lang, "source": unit.source,
                        "sequences": stop - start, "tokens": (stop - start) * rows.ids.shape[1]})
    return written


def _inherited(storage: Storage, base: StageRef | None, dtype: np.dtype) -> tuple[list[dict], list[dict], dict]:
    """The base output's index and shard entries, each pointing at the folder that holds its file,
    and its counts."""
    if base is None:
        return [], [], {}
    manifest = read_manifest(storage, base)
    if manifest.extra["token_dtype"] != str(dtype):
        raise TokenizeError(f"cannot append {dtype} shards to {base.uri}, which holds {manifest.extra['token_dtype']}")
    located = [{"output": base.fingerprint, **entry} for entry in manifest.extra["index"]]
    shards = [{"output": base.fingerprint, **entry} for entry in manifest.shards]
    return located, shards, manifest.counts


def _output(config: TokenizeConfig, storage: Storage, ref: StageRef, work: TokenizeWork, records: dict[str, dict],
            vocab_size: int, dtype: np.dtype, timings: dict) -> StageOutput:
    inherited_index, inherited_shards, inherited_counts = _inherited(storage, work.base, dtype)
    new_index = [entry for unit in work.units for entry in records[unit.unit_id]["files"]]
    index = inherited_index + new_index
    train_tokens: dict[str, int] = defaultdict(int)
    for entry in index:
        if entry["split"] == "train":
            train_tokens[f"{entry['lang']}/{entry['source']}"] += entry["tokens"]
    if not train_tokens:
        raise TokenizeError(f"the corpus is smaller than one training sequence of {config.seq_len + 1} tokens "
                            "per language: nothing to train on (lower tokenize.seq_len or add data)")
    mixture = repeat_factors(dict(train_tokens), config.mixture.weights, config.mixture.max_repeats)
    counts: dict[str, int] = defaultdict(int)
    for key, value in inherited_counts.items():
        if not key.startswith("appended_"):
            counts[key] += value
    for unit in work.units:
        for key, value in records[unit.unit_id]["counts"].items():
            counts[key] += value
    for entry in new_index:
        for prefix in ("", "appended_") if work.base else ("",):
            counts[f"{prefix}{entry['split']}_sequences"] += entry["sequences"]
            counts[f"{prefix}{entry['split']}_tokens"] += entry["tokens"]
    stored = {path: sums for unit in work.units for path, sums in records[unit.unit_id]["stored"].items()}
    shards = inherited_shards + [{**entry, **stored[entry["path"]]} for entry in new_index]
    return StageOutput(
        counts=dict(counts), shards=shards, timings=timings,
        extra={"index": index, "mixture": mixture, "seq_len": config.seq_len, "token_dtype": str(dtype),
               "vocab_size": vocab_size, "tokenizer": "tokenizer", "base": work.base and work.base.uri,
               # Listed for verified reuse. No done-record names them: the shards were encoded with
               # this tokenizer, so a damaged one reruns the whole stage rather than training another.
               "files": folder_entries(storage, ref, ref.path("tokenizer")),
               "plots": _plots(storage, ref, mixture)},
    )


STAGE = TokenizeStage()
