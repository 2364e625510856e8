"""The cleaning stage: raw inputs -> cleaned Parquet shards + rejects + stats, under the stage
contract (``<root>/clean/<fingerprint>/``, done-records per task and phase, manifest last).

Phases, each resumable, each per-shard or per-partition one running on the configured executor:
1. ``classifier`` - train a quality model per language from its example files (stage artifacts);
2. ``filter``  (per shard) - read, extract, tag structured text, identify language, heuristic
   filters, quality model against its language's threshold;
3. the global decisions, partitioned (``dedup_phases``): ``index``, ``share``, ``exact``,
   ``bands``, ``near``, ``clusters``, ``settle``, ``lines`` - the structured-text share, exact
   and near-duplicate clusters, recurring lines;
4. ``apply``   (per shard) - drop what was decided, cut recurring lines, write the final shards.
Shards are read and written a row group at a time: a worker holds a batch, not a shard.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace

import pyarrow as pa

from skymoe.pipelines.clean import dedup
from skymoe.pipelines.clean.classifier import ClassifierError, QualityModel, QualityScorer, train_quality_model
from skymoe.pipelines.clean.dedup_phases import (
    DECISIONS,
    INDEX,
    BandShard,
    DedupRun,
    ExactPartition,
    IndexShard,
    LinePartition,
    NearPartition,
    SettleShard,
    near_clusters,
    recurring_lines,
    structured_share,
)
from skymoe.pipelines.clean.executors import ShardTask, executor_session, map_shards
from skymoe.pipelines.clean.heuristics import heuristic_steps
from skymoe.pipelines.clean.history import KEPT_BANDS, KEPT_EXACT, LINE_COUNTS, load_history
from skymoe.pipelines.clean.langid import LanguageId
from skymoe.pipelines.clean.readers import InputError, InputShard, ShardReader, discover_inputs, expand_input
from skymoe.pipelines.clean.steps import ORIGINAL, REJECT
from skymoe.pipelines.clean.structured import StructuredTagger
from skymoe.pipelines.clean.tables import RowWriter, iter_batches, read_table, row_writer
from skymoe.config import CleanConfig, ConfigError, PipelineConfig, describe_path
from skymoe.plots import bar_chart_png
from skymoe.progress import Progress
from skymoe.stage import Continuation, DoneRecords, Plan, Stage, StageOutput, StageRef, shard_entry
from skymoe.storage import Storage

log = logging.getLogger("skymoe.clean")
# Below this many documents (after filtering), the dedup phases run in-process on datatrove's executor.
IN_PROCESS_DEDUP_DOCS = 20_000
# A damaged input's entry names at most this many of its problems (a shredded WARC can have thousands).
MAX_PROBLEMS_LISTED = 20

DOC_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("lang_score", pa.float32()), ("quality_score", pa.float32()), ("url", pa.string()),
    ("structured", pa.string()),  # the kind of structured text (json, xml, html, yaml, csv, markdown_table); null for prose
])
REJECT_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("source", pa.string()), ("stage", pa.string()),
    ("step", pa.string()), ("reason", pa.string()), ("original", pa.string()),
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
        "stage", "classifier", "dedup", "dedup_phases", "extract", "heuristics", "history", "langid", "partitions",
        "readers", "steps", "structured", "tables", "text"))
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
        shards, skipped = discover_inputs(storage, clean.inputs, clean.reader.text_field, clean.reader.split_bytes,
                                          read_hidden=clean.reader.hidden == "read")
        shards = [shard for shard in shards if seen.get(shard.uri) != shard.checksum]
        inputs = {shard.uri: shard.checksum for shard in shards} | {f"prior:{ref.uri}": ref.fingerprint
                                                                    for ref in prior}
        return [self.make_plan(config, _fingerprinted_config(clean, storage), inputs,
                               work=CleanWork(shards, skipped, tuple(prior)))]

    def run(self, plan: Plan, storage: Storage) -> StageOutput:
        config, ref, work = plan.config.clean, plan.ref, plan.work
        for item in work.skipped:  # licenses and READMEs are expected beside data; anything else is worth a look
            level = logging.INFO if item["reason"].startswith("not_data") else logging.WARNING
            log.log(level, "clean: not reading %s (%s)", item["uri"], item["reason"])
        log.info("clean: %d input shards -> %s", len(work.shards), ref.uri)
        timings: dict[str, float] = {}
        models = _quality_models(config, storage, ref, work.prior, timings)
        history = load_history(storage, work.prior, config.dedup.partitions)
        with executor_session(config.executor):
            _run_phases(DedupRun(config, storage, ref, work.shards, history), models, timings)
        output = _output(storage, ref, work, models, timings, config)
        for item in output.extra["damaged_inputs"]:
            log.warning("clean: %s is damaged; what could be read of it was (%s)", item["uri"], item["reason"])
        log.info("clean: %d -> %d documents", output.counts["docs_in"], output.counts["docs_out"])
        return output


def _run_phases(run: DedupRun, models: dict[str, QualityModel], timings: dict) -> None:
    """filter, the partitioned dedup phases (``dedup_phases``), apply: in order, each resumable."""
    config, storage, ref = run.config, run.storage, run.ref
    shards = [shard.shard_id for shard in run.shards]
    partitions = [f"p{p:04d}" for p in range(config.dedup.partitions)]

    def phase(name: str, task: ShardTask, units: list[str], executor: CleanConfig = config) -> None:
        _run_phase(name, task, executor, storage, ref, units, timings)

    phase("filter", FilterShard(config, storage, ref, run.shards, models), shards)
    dedup = _dedup_phase_config(config, storage, ref)
    phase("index", IndexShard(run), shards, dedup)
    run = replace(run, structured_keep=_once("share", lambda: structured_share(run), storage, ref,
                                             timings)["keep_probability"])
    if config.dedup.exact:
        phase("exact", ExactPartition(run), partitions, dedup)
    if config.dedup.minhash.enabled:
        phase("bands", BandShard(run), shards, dedup)
        phase("near", NearPartition(run), partitions, dedup)
        _once("clusters", lambda: near_clusters(run), storage, ref, timings)
    phase("settle", SettleShard(run), shards, dedup)
    phase("lines", LinePartition(run), partitions, dedup)
    phase("apply", ApplyShard(run), shards)


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
        for lang, examples in config.classifier.languages.items():
            for side in ("positive", "negative"):
                settings["classifier"]["languages"][lang][side] = [
                    content(uri, f"classifier.languages.{lang}.{side}") for uri in getattr(examples, side)]
    if config.heuristics.enabled and config.heuristics.blocklist.enabled:
        settings["heuristics"]["blocklist"]["files"] = {
            lang: content(path, f"heuristics.blocklist.files.{lang}")
            for lang, path in config.heuristics.blocklist.files.items()
        }
    return settings


def _quality_models(config: CleanConfig, storage: Storage, ref: StageRef, prior: tuple[StageRef, ...],
                    timings: dict) -> dict[str, QualityModel]:
    """Train a quality model per language (``classifier/<lang>.*``), or, in an incremental run,
    reuse the first generation's: the same bar for every batch (a small new batch would also be a
    poor sample). A model is loaded against the checksums its done-record holds."""
    if not config.classifier.enabled:
        return {}
    owner = prior[0] if prior else ref
    done = DoneRecords(storage, owner, "classifier")
    folder = owner.path("classifier")
    started = time.monotonic()
    for lang, examples in sorted(config.classifier.languages.items()):
        if done.get(lang) is None:
            if prior:
                raise ClassifierError(f"the series' first cleaning output {owner.uri} has no quality model for "
                                      f"{lang!r} (classifier.languages changed within the series): start a new one")
            model = train_quality_model(storage, lang, examples, config.classifier)
            done.mark(lang, {"files": model.save(storage, folder), "threshold": model.threshold,
                             "metrics": model.metrics})
            log.info("clean: quality model %s: threshold %.4f, %s", lang, model.threshold, model.metrics)
    if not prior:
        timings["classifier"] = round(time.monotonic() - started, 3)
    return {lang: QualityModel.load(storage, folder, lang, done.get(lang)["files"])
            for lang in sorted(config.classifier.languages)}


def _run_phase(phase: str, task: ShardTask, config: CleanConfig, storage: Storage, ref: StageRef,
               units: list[str], timings: dict) -> None:
    """Run ``task`` for every unit (a shard id, or a partition ``pNNNN``) without a done-record."""
    records = DoneRecords(storage, ref, phase)
    done = records.ids()
    pending = [i for i, unit in enumerate(units) if unit not in done]
    started = time.monotonic()
    if pending:
        log.info("clean/%s: %d of %d tasks to do (%s executor)", phase, len(pending), len(units),
                 config.executor.kind)
        progress = Progress(f"clean/{phase}", len(pending), "tasks", log)
        with progress.watching(lambda: len(records.ids() - done)):
            map_shards(config.executor, task, pending, f"clean-{phase}")
        progress.done = len(records.ids() - done)
        progress.close()
    missing = [unit for unit in units if unit not in records.ids()]
    if missing:
        raise RuntimeError(f"clean/{phase}: tasks {missing} did not finish")
    timings[phase] = round(time.monotonic() - started, 3)


def _dedup_phase_config(config: CleanConfig, storage: Storage, ref: StageRef) -> CleanConfig:
    """The config for the dedup phases: on datatrove's local executor, a run of few documents does
    them in this process, since each task then takes less than starting a worker process does."""
    kept = sum(record["kept"] for record in DoneRecords(storage, ref, "filter").all().values())
    if config.executor.kind != "datatrove" or kept >= IN_PROCESS_DEDUP_DOCS:
        return config
    return config.model_copy(update={"executor": config.executor.model_copy(update={"workers": 1})})


def _once(phase: str, step: Callable[[], dict], storage: Storage, ref: StageRef, timings: dict) -> dict:
    """A driver step: run once, its result kept as the phase's done-record (a resumed run reads it)."""
    records = DoneRecords(storage, ref, phase)
    result = records.get("all")
    if result is None:
        started = time.monotonic()
        result = step()
        records.mark("all", result)
        timings[phase] = round(time.monotonic() - started, 3)
    return result


# ------------------------------------------------------------------------------ shard tasks
def _reject_row(doc_id: str, shard: InputShard, source: str, step: str, reason: str, original: str) -> dict:
    return {"id": doc_id, "shard": shard.shard_id, "source": source, "stage": "clean", "step": step,
            "reason": reason, "original": original}


def _reason_key(step: str, reason: str) -> str:
    """Counting key: step and reason, with record-specific detail after ':' left out."""
    return f"{step}:{reason.split(':', 1)[0]}"


class FilterShard:
    """Phase 2 for one shard: the datatrove step chain, then kept rows and rejects written."""

    def __init__(self, config: CleanConfig, storage: Storage, ref: StageRef, shards: list[InputShard],
                 models: dict[str, QualityModel]):
        self.config, self.storage, self.ref, self.shards = config, storage, ref, shards
        self.steps = [
            ShardReader(shards, config.reader, storage, frozenset(config.reader.code_sources)),
            *([StructuredTagger()] if config.structured.enabled else []),
            LanguageId(config.language),
            *heuristic_steps(config.heuristics, storage),
            *([QualityScorer(models)] if models else []),
        ]

    def __call__(self, index: int) -> None:
        shard = self.shards[index]
        reader = self.steps[0]
        docs = None
        for step in self.steps:
            docs = step.run(docs, rank=index, world_size=len(self.shards))
        reasons, langs = Counter(), Counter()
        progress = Progress(f"clean/filter {shard.uri.rsplit('/', 1)[-1]}", None, "docs", log)
        with row_writer(self.storage, self.ref.path("filtered", f"{shard.shard_id}.parquet"), DOC_SCHEMA) as kept, \
                row_writer(self.storage, self.ref.path("rejects", f"{shard.shard_id}-filter.parquet"),
                           REJECT_SCHEMA) as rejects:
            for doc in docs:
                meta = doc.metadata
                if REJECT in meta:
                    rejection = meta[REJECT]
                    reasons[_reason_key(rejection["step"], rejection["reason"])] += 1
                    rejects.add(_reject_row(doc.id, shard, meta.get("source", shard.source), rejection["step"],
                                            rejection["reason"], meta.get(ORIGINAL, doc.text)))
                else:
                    langs[meta["lang"]] += 1
                    kept.add({"id": doc.id, "text": doc.text, "source": meta.get("source"), "lang": meta["lang"],
                              "lang_score": meta.get("lang_score"), "quality_score": meta.get("quality_score"),
                              "url": meta.get("url"), "structured": meta.get("structured")})
                progress.update()
        DoneRecords(self.storage, self.ref, "filter").mark(shard.shard_id, {
            "docs_in": kept.count + rejects.count, "kept": kept.count, "rejects": dict(reasons), "langs": dict(langs),
            "damaged": reader.damaged.pop(shard.shard_id),
        })


class ApplyShard:
    """The last phase for one shard: apply decisions, cut recurring lines, write final shards."""

    def __init__(self, run: DedupRun):
        self.run = run

    def __call__(self, index: int) -> None:
        run, storage = self.run, self.run.storage
        shard = run.shards[index]
        rc = run.config.dedup.recurring
        decisions = read_table(storage, run.shard_file(DECISIONS, index))
        decided = dict(zip(decisions["row"].to_pylist(), zip(decisions["step"].to_pylist(),
                                                              decisions["reason"].to_pylist())))
        recurring = recurring_lines(run) if rc.enabled else set()
        reasons, langs, outputs = Counter(), Counter(), []
        lines_cut = 0
        rejects_uri = run.ref.path("rejects", f"{shard.shard_id}-dedup.parquet")
        with row_writer(storage, rejects_uri, REJECT_SCHEMA) as rejects, \
                _OutputParts(storage, run.ref, shard.shard_id, run.config.docs_per_output_shard, outputs) as kept:
            for first, batch in iter_batches(storage, run.ref.path("filtered", f"{shard.shard_id}.parquet")):
                for row, doc in enumerate(batch.to_pylist(), start=first):
                    original = doc
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
                        rejects.add(_reject_row(doc["id"], shard, doc["source"], verdict[0], verdict[1],
                                                json.dumps(original, ensure_ascii=False)))
                        continue
                    langs[doc["lang"]] += 1
                    kept.add(doc)
        DoneRecords(storage, run.ref, "apply").mark(shard.shard_id, {
            "kept": sum(o["docs"] for o in outputs), "rejects": dict(reasons), "langs": dict(langs),
            "lines_cut": lines_cut, "outputs": outputs,
        })


class _OutputParts:
    """A shard's final documents as ``<shard>-<part>.parquet`` files of at most ``per_file`` documents
    (a shard with none still gets one, empty, file); ``outputs`` lists each file and its count."""

    def __init__(self, storage: Storage, ref: StageRef, shard_id: str, per_file: int, outputs: list[dict]):
        self.storage, self.ref, self.shard_id, self.per_file, self.outputs = storage, ref, shard_id, per_file, outputs
        self.files = ExitStack()
        self.part: RowWriter | None = None

    def add(self, doc: dict) -> None:
        if self.part is None or self.part.count >= self.per_file:
            self._next_part()
        self.part.add(doc)
        self.outputs[-1]["docs"] += 1

    def _next_part(self) -> None:
        self.files.close()  # the previous part is complete
        uri = self.ref.path("data", f"{self.shard_id}-{len(self.outputs):04d}.parquet")
        self.part = self.files.enter_context(row_writer(self.storage, uri, DOC_SCHEMA))
        self.outputs.append({"uri": uri, "docs": 0})

    def __enter__(self) -> "_OutputParts":
        return self

    def __exit__(self, *error) -> None:
        if error[1] is None and self.part is None:
            self._next_part()
        self.files.__exit__(*error)


# ------------------------------------------------------------------------------ manifest
def _plots(storage: Storage, ref: StageRef, counts: dict) -> list[str]:
    """Where the documents went: kept per language and rejected per reason."""
    values = {f"kept ({lang})": n for lang, n in counts["docs_out_by_lang"].items()}
    values |= {f"rejected: {reason}": n for reason, n in counts["rejects_by_reason"].items()}
    uri = ref.path("report", "documents.png")
    storage.write_bytes(uri, bar_chart_png(f"clean: {counts['docs_in']:,} documents in", values, "documents"))
    return ["report/documents.png"]


def _output(storage: Storage, ref: StageRef, work: CleanWork, models: dict[str, QualityModel],
            timings: dict, config: CleanConfig) -> StageOutput:
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
    exact = DoneRecords(storage, ref, "exact").all().values()
    clusters = DoneRecords(storage, ref, "clusters").get("all") or {}
    counts = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "rejected": docs_in - docs_out,
        "rejects_by_reason": dict(sorted(rejects.items())),
        "docs_out_by_lang": dict(sorted(langs.items())),
        "lines_cut_recurring": sum(applied[s.shard_id]["lines_cut"] for s in shards),
        "recurring_lines": sum(record["recurring"] for record in DoneRecords(storage, ref, "lines").all().values()),
        "duplicates_of_earlier": sum(record["of_earlier"] for record in exact) + clusters.get("of_earlier", 0),
    }
    extra = {
        "rejects": reject_entries,
        "dedup_index": [shard_entry(storage, ref.path(INDEX, f"{s.shard_id}.parquet"), ref) for s in shards],
        "quality_models": {lang: {"threshold": model.threshold, **model.metrics} for lang, model in models.items()},
        "structured_share": DoneRecords(storage, ref, "share").get("all"),
        "input_files": [{"uri": s.uri, "shard_id": s.shard_id, "source": s.source, "format": s.format}
                        | ({"bytes": [s.piece.start, s.piece.end]} if s.piece else {}) for s in shards],
        "skipped_inputs": work.skipped,
        "damaged_inputs": _damaged_inputs(shards, filtered),
        "prior": [prior.uri for prior in work.prior],
        "dedup_partitions": config.dedup.partitions,
        "dedup_history": {"kept_exact": KEPT_EXACT, "kept_bands": KEPT_BANDS, "line_counts": LINE_COUNTS},
        "plots": _plots(storage, ref, counts),
    }
    return StageOutput(counts=counts, shards=entries, timings=timings, extra=extra)


def _damaged_inputs(shards: list[InputShard], filtered: dict[str, dict]) -> list[dict[str, str]]:
    """One entry per input file that was read only in part or failed an integrity check (what its
    shards' readers found), with every problem in file order."""
    problems: dict[str, list[str]] = {}
    for shard in shards:
        problems.setdefault(shard.uri, []).extend(filtered[shard.shard_id]["damaged"])
    entries = []
    for uri, found in problems.items():
        if len(found) > MAX_PROBLEMS_LISTED:
            found = found[:MAX_PROBLEMS_LISTED] + [f"{len(found) - MAX_PROBLEMS_LISTED} more"]
        if found:
            entries.append({"uri": uri, "reason": "; ".join(found)})
    return entries


STAGE = CleanStage()
