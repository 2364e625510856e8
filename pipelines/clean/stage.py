"""The cleaning stage: raw inputs -> cleaned Parquet shards + rejects + stats, under the stage
contract (``<root>/clean/<fingerprint>/``, done-records per shard and phase, manifest last).

Phases, each resumable:
1. ``classifier`` - train the quality classifier from its example files (a stage artifact);
2. ``filter``  (per shard) - read, extract, identify language, heuristic filters, score quality;
3. ``index``   (per shard) - exact hash, MinHash signature and line hashes of each kept document
   (the dedup index, kept as an artifact so later runs can deduplicate against it);
4. ``decide``  (global)    - quality buckets per language, exact and near-duplicate clusters,
   recurring lines;
5. ``apply``   (per shard) - drop what was decided, cut recurring lines, write the final shards.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skymoe.pipelines.clean import dedup
from skymoe.pipelines.clean.classifier import QualityModel, QualityScorer, train_quality_model
from skymoe.pipelines.clean.executors import ShardTask, map_shards
from skymoe.pipelines.clean.heuristics import heuristic_steps
from skymoe.pipelines.clean.history import (
    KEPT_INDEX,
    KEPT_SCHEMA,
    LINE_COUNT_SCHEMA,
    LINE_COUNTS,
    History,
    accumulate_line_counts,
    load_history,
    write_parquet,
)
from skymoe.pipelines.clean.langid import LanguageId
from skymoe.pipelines.clean.readers import InputError, InputShard, ShardReader, discover_inputs, expand_input
from skymoe.pipelines.clean.steps import ORIGINAL, REJECT
from skymoe.config import CleanConfig, ConfigError, PipelineConfig, bucket_names, describe_path
from skymoe.plots import bar_chart_png
from skymoe.progress import Progress
from skymoe.stage import Continuation, DoneRecords, Plan, Stage, StageOutput, StageRef, shard_entry
from skymoe.storage import Storage

log = logging.getLogger("skymoe.clean")

DOC_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("lang_score", pa.float32()), ("quality_score", pa.float32()), ("url", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("source", pa.string()), ("stage", pa.string()),
    ("step", pa.string()), ("reason", pa.string()), ("original", pa.string()),
])
INDEX_SCHEMA = pa.schema([
    ("row", pa.int32()), ("lang", pa.string()), ("quality_score", pa.float32()), ("exact_hash", pa.uint64()),
    ("minhash", pa.list_(pa.uint32())), ("line_hashes", pa.list_(pa.uint64())),
])


@dataclass(frozen=True)
class CleanWork:
    """What a run will read, what it skips, and which earlier outputs (``prior``, oldest first) its
    documents are deduplicated against."""

    shards: list[InputShard]
    skipped: list[dict[str, str]]
    prior: tuple[StageRef, ...] = ()


class CleanStage(Stage):
    """Raw inputs -> cleaned, deduplicated Parquet shards, rejects with reasons, and the dedup index."""

    name = "clean"
    section = "clean"
    # The executor module is left out on purpose: datatrove, Beam and Ray write the same bytes.
    code = tuple(f"skymoe.pipelines.clean.{module}" for module in (
        "stage", "classifier", "dedup", "extract", "heuristics", "history", "langid", "readers", "steps", "text"))
    libraries = ("datatrove", "trafilatura", "lingua-language-detector", "scikit-learn", "warcio", "pyarrow")

    def check(self, config: PipelineConfig, storage: Storage) -> None:
        """Resource files exist and every input names something (checksums wait for the plan)."""
        _fingerprinted_config(config.clean, storage)
        if not config.clean.inputs:
            raise InputError("no inputs given (clean.inputs in the config, or --input)")
        for pattern in config.clean.inputs:
            try:
                expand_input(storage, pattern)
            except InputError as err:
                raise InputError(f"clean.inputs: {err}; written as {describe_path(config, 'clean.inputs')}") from None

    def plan(self, config: PipelineConfig, storage: Storage, upstream: Mapping[str, StageRef],
             continues: Continuation | None = None) -> list[Plan]:
        """Check inputs and resource files, then fingerprint; raises before any work is done.

        A continuing run deduplicates against every earlier cleaning output and reads only inputs
        unseen (or changed) since: inputs are still discovered from the same patterns, so shard
        ids and sources match a full run, and a changed file's unchanged documents go as
        duplicates of the earlier ones.
        """
        clean = config.clean
        prior, seen = (continues.prior_clean, continues.seen) if continues else ((), {})
        shards, skipped = discover_inputs(storage, clean.inputs, clean.reader.text_field)
        shards = [shard for shard in shards if seen.get(shard.uri) != shard.checksum]
        inputs = {shard.uri: shard.checksum for shard in shards} | {f"prior:{ref.uri}": ref.fingerprint
                                                                    for ref in prior}
        return [self.make_plan(config, _fingerprinted_config(clean, storage), inputs,
                               work=CleanWork(shards, skipped, tuple(prior)))]

    def run(self, plan: Plan, storage: Storage) -> StageOutput:
        config, ref, work = plan.config.clean, plan.ref, plan.work
        for item in work.skipped:
            log.info("clean: not reading %s (%s)", item["uri"], item["why"])
        log.info("clean: %d input shards -> %s", len(work.shards), ref.uri)
        timings: dict[str, float] = {}
        model = _classifier(config, storage, ref, work.prior, timings)
        shards = work.shards
        _run_phase("filter", FilterShard(config, storage, ref, shards, model), config, storage, ref, shards, timings)
        _run_phase("index", IndexShard(config, storage, ref, shards), config, storage, ref, shards, timings)
        decide_started = time.monotonic()
        decisions = DoneRecords(storage, ref, "decide")
        if decisions.get("all") is None:
            mh = config.dedup.minhash
            history = load_history(storage, work.prior, mh.num_bands * mh.rows_per_band)
            decisions.mark("all", decide(config, storage, ref, shards, history))
        timings["decide"] = round(time.monotonic() - decide_started, 3)
        _run_phase("apply", ApplyShard(config, storage, ref, shards), config, storage, ref, shards, timings)
        output = _output(storage, ref, work, model, timings)
        log.info("clean: %d -> %d documents", output.counts["docs_in"], output.counts["docs_out"])
        return output


def _fingerprinted_config(config: CleanConfig, storage: Storage) -> dict:
    """The config as it affects output: resource files (classifier examples, blocklists) enter by
    content, not by path; inputs enter separately, by URI and checksum; the executor not at all
    (datatrove and Beam write identical output)."""
    settings = config.model_dump(mode="json", exclude={"inputs", "executor"})

    def content(uri: str, field: str) -> str:
        if not storage.exists(uri):
            raise ConfigError(f"clean.{field}: file not found: {uri}")
        return storage.checksum(uri)

    if config.classifier.enabled:
        for side in ("positive", "negative"):
            settings["classifier"][side] = [content(u, f"classifier.{side}") for u in getattr(config.classifier, side)]
    if config.heuristics.enabled and config.heuristics.blocklist.enabled:
        settings["heuristics"]["blocklist"]["files"] = {
            lang: content(path, f"heuristics.blocklist.files.{lang}")
            for lang, path in config.heuristics.blocklist.files.items()
        }
    return settings


def _classifier(config: CleanConfig, storage: Storage, ref: StageRef, prior: tuple[StageRef, ...],
                timings: dict) -> QualityModel | None:
    """Train the quality classifier, or, in an incremental run, reuse the first generation's
    (the same config trains the same model; a small new batch would also be a poor sample)."""
    if not config.classifier.enabled:
        return None
    if prior:
        return QualityModel.load(storage, prior[0].path("classifier", "model"))
    done = DoneRecords(storage, ref, "classifier")
    prefix = ref.path("classifier", "model")
    if done.get("model") is None:
        started = time.monotonic()
        model = train_quality_model(storage, config.classifier)
        model.save(storage, prefix)
        done.mark("model", model.metrics)
        timings["classifier"] = round(time.monotonic() - started, 3)
        log.info("clean: quality classifier trained: %s", model.metrics)
    return QualityModel.load(storage, prefix)


def _run_phase(phase: str, task: ShardTask, config: CleanConfig, storage: Storage, ref: StageRef,
               shards: list[InputShard], timings: dict) -> None:
    records = DoneRecords(storage, ref, phase)
    done = records.ids()
    pending = [i for i, shard in enumerate(shards) if shard.shard_id not in done]
    started = time.monotonic()
    if pending:
        log.info("clean/%s: %d of %d shards to do (%s executor)", phase, len(pending), len(shards),
                 config.executor.kind)
        progress = Progress(f"clean/{phase}", len(pending), "shards", log)
        with progress.watching(lambda: len(records.ids() - done)):
            map_shards(config.executor, task, pending, f"clean-{phase}")
        progress.done = len(records.ids() - done)
        progress.close()
    missing = [s.shard_id for s in shards if s.shard_id not in records.ids()]
    if missing:
        raise RuntimeError(f"clean/{phase}: shards {missing} did not finish")
    timings[phase] = round(time.monotonic() - started, 3)


# ------------------------------------------------------------------------------ shard tasks
def _write_table(storage: Storage, uri: str, rows: list[dict], schema: pa.Schema) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


def _read_table(storage: Storage, uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _reject_row(doc_id: str, shard: InputShard, source: str, step: str, reason: str, original: str) -> dict:
    return {"id": doc_id, "shard": shard.shard_id, "source": source, "stage": "clean", "step": step,
            "reason": reason, "original": original}


def _reason_key(step: str, reason: str) -> str:
    """Counting key: step and reason, with record-specific detail after ':' left out."""
    return f"{step}:{reason.split(':', 1)[0]}"


class FilterShard:
    """Phase 2 for one shard: the datatrove step chain, then kept rows and rejects written."""

    def __init__(self, config: CleanConfig, storage: Storage, ref: StageRef, shards: list[InputShard],
                 model: QualityModel | None):
        self.config, self.storage, self.ref, self.shards = config, storage, ref, shards
        self.steps = [
            ShardReader(shards, config.reader, storage, frozenset(config.reader.code_sources)),
            LanguageId(config.language),
            *heuristic_steps(config.heuristics, storage),
            *([QualityScorer(model)] if model is not None else []),
        ]

    def __call__(self, index: int) -> None:
        shard = self.shards[index]
        docs = None
        for step in self.steps:
            docs = step.run(docs, rank=index, world_size=len(self.shards))
        kept, rejects, reasons, langs = [], [], Counter(), Counter()
        progress = Progress(f"clean/filter {shard.uri.rsplit('/', 1)[-1]}", None, "docs", log)
        for doc in docs:
            meta = doc.metadata
            if REJECT in meta:
                rejection = meta[REJECT]
                reasons[_reason_key(rejection["step"], rejection["reason"])] += 1
                rejects.append(_reject_row(doc.id, shard, meta.get("source", shard.source), rejection["step"],
                                           rejection["reason"], meta.get(ORIGINAL, doc.text)))
            else:
                langs[meta["lang"]] += 1
                kept.append({"id": doc.id, "text": doc.text, "source": meta.get("source"), "lang": meta["lang"],
                             "lang_score": meta.get("lang_score"), "quality_score": meta.get("quality_score"),
                             "url": meta.get("url")})
            progress.update()
        _write_table(self.storage, self.ref.path("filtered", f"{shard.shard_id}.parquet"), kept, DOC_SCHEMA)
        _write_table(self.storage, self.ref.path("rejects", f"{shard.shard_id}-filter.parquet"), rejects,
                     REJECT_SCHEMA)
        DoneRecords(self.storage, self.ref, "filter").mark(shard.shard_id, {
            "docs_in": len(kept) + len(rejects), "kept": len(kept), "rejects": dict(reasons), "langs": dict(langs),
        })


class IndexShard:
    """Phase 3 for one shard: the dedup index of its kept documents."""

    def __init__(self, config: CleanConfig, storage: Storage, ref: StageRef, shards: list[InputShard]):
        self.config, self.storage, self.ref, self.shards = config, storage, ref, shards
        mh = config.dedup.minhash
        self.hasher = dedup.MinHasher(mh.num_bands, mh.rows_per_band, mh.ngram, mh.seed)

    def __call__(self, index: int) -> None:
        shard = self.shards[index]
        table = _read_table(self.storage, self.ref.path("filtered", f"{shard.shard_id}.parquet"))
        min_chars = self.config.dedup.recurring.min_line_chars
        rows = []
        for row, (text, lang, score) in enumerate(zip(table["text"].to_pylist(), table["lang"].to_pylist(),
                                                      table["quality_score"].to_pylist())):
            rows.append({"row": row, "lang": lang, "quality_score": score,
                         "exact_hash": dedup.normalized_hash(text),
                         "minhash": self.hasher.signature(text, lang).tolist(),
                         "line_hashes": dedup.line_hashes(text, min_chars).tolist()})
        _write_table(self.storage, self.ref.path("dedup_index", f"{shard.shard_id}.parquet"), rows, INDEX_SCHEMA)
        DoneRecords(self.storage, self.ref, "index").mark(shard.shard_id, {"docs": len(rows)})


def decide(config: CleanConfig, storage: Storage, ref: StageRef, shards: list[InputShard], history: History) -> dict:
    """Phase 4: global decisions over the whole index, in input order (first occurrence wins;
    documents kept by earlier generations in ``history`` come before all of this run's)."""
    tables = [_read_table(storage, ref.path("dedup_index", f"{s.shard_id}.parquet")) for s in shards]
    shard_of = np.concatenate([np.full(len(t), i, dtype=np.int32) for i, t in enumerate(tables)] or [[]])
    row_of = np.concatenate([t["row"].to_numpy() for t in tables] or [[]]).astype(np.int64)
    langs = np.array([lang for t in tables for lang in t["lang"].to_pylist()], dtype=object)
    hashes = np.concatenate([t["exact_hash"].to_numpy() for t in tables] or [np.zeros(0, np.uint64)])
    n_docs = len(row_of)
    alive = np.ones(n_docs, dtype=bool)  # not dropped by an earlier decision
    reason = np.full(n_docs, None, dtype=object)
    step = np.full(n_docs, None, dtype=object)

    def drop(mask: np.ndarray, step_name: str, why: str | Callable[[int], str]) -> None:
        for i in np.flatnonzero(mask & alive):
            reason[i] = why(i) if callable(why) else why
            step[i] = step_name
            alive[i] = False

    def key_of(i: int) -> str:
        """A document of this run (index >= 0) or of the history (index - len(history) < 0)."""
        return _doc_key(shards, shard_of, row_of, i) if i >= 0 else history.keys[i + len(history)]

    bucket_edges: dict[str, list[float]] = {}
    if config.classifier.enabled and n_docs:
        scores = np.concatenate([t["quality_score"].to_numpy(zero_copy_only=False) for t in tables]).astype(float)
        names = bucket_names(len(config.classifier.bucket_quantiles) + 1)
        keep = set(config.classifier.keep_buckets)
        for lang in sorted(set(langs) - {"code"}):
            in_lang = langs == lang
            # Thresholds from the top: quantile q of "best first" ordering splits head from the rest.
            edges = history.bucket_edges.get(lang) or [float(np.quantile(scores[in_lang], 1 - q))
                                                       for q in config.classifier.bucket_quantiles]
            bucket_edges[lang] = edges
            bucket_index = (scores[:, None] < np.array(edges)[None, :]).sum(axis=1)
            for b, name in enumerate(names):
                if name not in keep:
                    drop(in_lang & (bucket_index == b), "quality_classifier", f"bucket_{name}")

    earlier_duplicates = 0
    if config.dedup.exact and n_docs:
        earlier = history.exact_matches(hashes)
        earlier_duplicates += int((alive & (earlier >= 0)).sum())
        drop(earlier >= 0, "exact_dedup", lambda i: f"duplicate_of: {history.keys[earlier[i]]}")
        _, first = np.unique(hashes[alive], return_index=True)
        alive_idx = np.flatnonzero(alive)
        first_of = {hashes[alive_idx[f]]: alive_idx[f] for f in first}
        dup = np.zeros(n_docs, dtype=bool)
        dup[alive_idx] = True
        dup[list(first_of.values())] = False
        drop(dup, "exact_dedup", lambda i: f"duplicate_of: {key_of(first_of[hashes[i]])}")

    mh = config.dedup.minhash
    near_dups = 0
    signatures = np.zeros((0, mh.num_bands * mh.rows_per_band), dtype=np.uint32)
    if n_docs:
        signatures = np.stack([np.asarray(sig, dtype=np.uint32) for t in tables for sig in t["minhash"].to_pylist()])
    if mh.enabled and n_docs:
        # Earlier generations' kept documents first: a cluster's first member is then the old one.
        combined = np.concatenate([history.signatures, signatures])
        root = dedup.near_duplicate_clusters(combined, mh.num_bands, mh.rows_per_band,
                                             np.concatenate([np.ones(len(history), bool), alive]))[len(history):]
        root -= len(history)
        is_dup = root != np.arange(n_docs)
        near_dups = int(is_dup.sum())
        earlier_duplicates += int((is_dup & alive & (root < 0)).sum())
        drop(is_dup, "near_dedup", lambda i: f"near_duplicate_of: {key_of(root[i])}")

    rc = config.dedup.recurring
    per_doc = [np.asarray(h, dtype=np.uint64) for t in tables for h in t["line_hashes"].to_pylist()]
    line_hashes, line_docs = accumulate_line_counts(history, [h for h, a in zip(per_doc, alive) if a])
    recurring = line_hashes[line_docs >= rc.min_docs] if rc.enabled else np.zeros(0, dtype=np.uint64)
    storage.write_bytes(ref.path("dedup", "recurring_lines.npy"), _npy(recurring))
    write_parquet(storage, ref.path(LINE_COUNTS), {"line_hash": line_hashes, "docs": line_docs}, LINE_COUNT_SCHEMA)
    kept = np.flatnonzero(alive)
    write_parquet(storage, ref.path(KEPT_INDEX), {
        "key": [_doc_key(shards, shard_of, row_of, i) for i in kept],
        "exact_hash": hashes[kept],
        "minhash": pa.array(list(signatures[kept]), type=pa.list_(pa.uint32())),
    }, KEPT_SCHEMA)

    dropped = np.flatnonzero(~alive)
    _write_table(storage, ref.path("dedup", "decisions.parquet"), [
        {"shard": shards[shard_of[i]].shard_id, "row": int(row_of[i]), "step": step[i], "reason": reason[i]}
        for i in dropped
    ], pa.schema([("shard", pa.string()), ("row", pa.int64()), ("step", pa.string()), ("reason", pa.string())]))
    return {"docs": n_docs, "dropped": len(dropped), "near_duplicates": near_dups,
            "duplicates_of_earlier": earlier_duplicates, "recurring_lines": len(recurring),
            "bucket_edges": bucket_edges}


def _doc_key(shards: list[InputShard], shard_of: np.ndarray, row_of: np.ndarray, i: int) -> str:
    return f"{shards[shard_of[i]].shard_id}/{row_of[i]}"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class ApplyShard:
    """Phase 5 for one shard: apply decisions, cut recurring lines, write final shards."""

    def __init__(self, config: CleanConfig, storage: Storage, ref: StageRef, shards: list[InputShard]):
        self.config, self.storage, self.ref, self.shards = config, storage, ref, shards

    def __call__(self, index: int) -> None:
        shard = self.shards[index]
        rc = self.config.dedup.recurring
        table = _read_table(self.storage, self.ref.path("filtered", f"{shard.shard_id}.parquet"))
        decisions = _read_table(self.storage, self.ref.path("dedup", "decisions.parquet"))
        mine = decisions.filter(pc.equal(decisions["shard"], shard.shard_id)).to_pylist()
        decided = {d["row"]: (d["step"], d["reason"]) for d in mine}
        recurring = set(np.load(io.BytesIO(self.storage.read_bytes(self.ref.path("dedup", "recurring_lines.npy"))))
                        .tolist()) if rc.enabled else set()
        kept, rejects, reasons, langs = [], [], Counter(), Counter()
        lines_cut = 0
        for row, doc in enumerate(table.to_pylist()):
            verdict = decided.get(row)
            if verdict is None and recurring:
                text, cut = dedup.remove_lines(doc["text"], recurring, rc.min_line_chars)
                if cut:
                    lines_cut += cut
                    if len(text) < rc.min_chars_after:
                        verdict = ("recurring_text", f"too_short_after_removal: {len(text)} chars")
                    doc = {**doc, "text": text}
            if verdict is not None:
                reasons[_reason_key(*verdict)] += 1
                rejects.append(_reject_row(doc["id"], shard, doc["source"], verdict[0], verdict[1],
                                           json.dumps(table.slice(row, 1).to_pylist()[0], ensure_ascii=False)))
                continue
            langs[doc["lang"]] += 1
            kept.append(doc)
        per_file = self.config.docs_per_output_shard
        outputs = []
        for part, start in enumerate(range(0, max(len(kept), 1), per_file)):
            uri = self.ref.path("data", f"{shard.shard_id}-{part:04d}.parquet")
            _write_table(self.storage, uri, kept[start : start + per_file], DOC_SCHEMA)
            outputs.append({"uri": uri, "docs": len(kept[start : start + per_file])})
        rejects_uri = self.ref.path("rejects", f"{shard.shard_id}-dedup.parquet")
        _write_table(self.storage, rejects_uri, rejects, REJECT_SCHEMA)
        DoneRecords(self.storage, self.ref, "apply").mark(shard.shard_id, {
            "kept": len(kept), "rejects": dict(reasons), "langs": dict(langs), "lines_cut": lines_cut,
            "outputs": outputs,
        })


# ------------------------------------------------------------------------------ manifest
def _plots(storage: Storage, ref: StageRef, counts: dict) -> list[str]:
    """Where the documents went: kept per language and rejected per reason."""
    values = {f"kept ({lang})": n for lang, n in counts["docs_out_by_lang"].items()}
    values |= {f"rejected: {reason}": n for reason, n in counts["rejects_by_reason"].items()}
    uri = ref.path("report", "documents.png")
    storage.write_bytes(uri, bar_chart_png(f"clean: {counts['docs_in']:,} documents in", values, "documents"))
    return ["report/documents.png"]


def _output(storage: Storage, ref: StageRef, work: CleanWork, model: QualityModel | None,
            timings: dict) -> StageOutput:
    shards = work.shards
    filtered = DoneRecords(storage, ref, "filter").all()
    applied = DoneRecords(storage, ref, "apply").all()
    rejects: Counter = Counter()
    langs: Counter = Counter()
    entries, reject_entries = [], []
    for shard in shards:
        rejects.update(filtered[shard.shard_id]["rejects"])
        rejects.update(applied[shard.shard_id]["rejects"])
        langs.update(applied[shard.shard_id]["langs"])
        for output in applied[shard.shard_id]["outputs"]:
            entries.append(shard_entry(storage, output["uri"], ref, docs=output["docs"], input=shard.uri))
        for kind in ("filter", "dedup"):
            reject_entries.append(shard_entry(storage, ref.path("rejects", f"{shard.shard_id}-{kind}.parquet"), ref))
    docs_in = sum(filtered[s.shard_id]["docs_in"] for s in shards)
    docs_out = sum(applied[s.shard_id]["kept"] for s in shards)
    decide_record = DoneRecords(storage, ref, "decide").get("all") or {}
    counts = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "rejected": docs_in - docs_out,
        "rejects_by_reason": dict(sorted(rejects.items())),
        "docs_out_by_lang": dict(sorted(langs.items())),
        "lines_cut_recurring": sum(applied[s.shard_id]["lines_cut"] for s in shards),
        "recurring_lines": decide_record.get("recurring_lines", 0),
        "duplicates_of_earlier": decide_record.get("duplicates_of_earlier", 0),
    }
    extra = {
        "rejects": reject_entries,
        "dedup_index": [shard_entry(storage, ref.path("dedup_index", f"{s.shard_id}.parquet"), ref) for s in shards],
        "quality_buckets": decide_record.get("bucket_edges", {}),
        "classifier": model.metrics if model is not None else None,
        "input_files": [{"uri": s.uri, "shard_id": s.shard_id, "source": s.source, "format": s.format}
                        for s in shards],
        "skipped_inputs": work.skipped,
        "prior": [prior.uri for prior in work.prior],
        "kept_index": KEPT_INDEX,
        "plots": _plots(storage, ref, counts),
    }
    return StageOutput(counts=counts, shards=entries, timings=timings, extra=extra)


STAGE = CleanStage()
