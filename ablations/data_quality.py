"""The data ablation (issue 14, item 5; DCLM / FineWeb style): does cleaning buy a better model?

The same tiny MoE, with the same token budget and the same seeds, is trained on three cleaning
variants of one raw corpus:

- ``a-langid-exact``: language id and exact dedup only (heuristics, quality models, MinHash
  near-dup, recurring-line removal and the structured-text share off);
- ``b-heuristics-neardup``: the config's cleaning without its quality models (heuristics, near-dup,
  recurring lines and the structured share as the config sets them);
- ``c-quality-models``: the config's full cleaning, its per-language quality models included.

Each variant is scored by its next-token loss, per language, on a **held-out set of clean text**
that none of them trains on: the documents of the hand-labelled quality evaluation set
(``examples/quality/eval/{zh,en}.jsonl``) labelled ``good`` and not borderline. Entries with a
``text`` field are read from the file; reference-only ones (raw Common Crawl, CLUE, Skywork news)
from the shared data folder when it is present. Every held-out document is taken out of the raw
corpus before cleaning, and each variant's cleaned output is checked to share none of them
(exact text, or more than half of the smaller document's 30-character shingles).

The raw corpus is the config's ``clean.inputs`` (the bundled demo corpus for ``tiny``) plus, when
the shared data folder exists (``SKYMOE_SHARED_DATA``, default ``../shared/data`` beside the
checkout), real raw web text read from it: the ChineseWebText Common Crawl pages (field
``raw_content``) and the CLUE small-corpus sample. It is written, minus the held-out documents,
under ``<root>/ablate/data-quality/corpus/<fingerprint>/`` (never into the repository) and cleaned
once per variant through ``run_pipeline`` (cached like ``skymoe run``'s stages).

All variants tokenize with one tokenizer: the one trained on variant (a)'s corpus (the largest,
which holds every other variant's documents), or the config's ``tokenize.tokenizer.path`` when it
names one. So the held-out text becomes the same ids for every variant, the models have the same
vocabulary and the same initial weights per seed, and the losses compare directly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skymoe.ablations.run import _NOT_FINGERPRINTED, AblationPlan, AblationRun, done_record, seeds_for
from skymoe.ablations.variants import SIZES, Size, Variant, _merge, _phase, sized_train
from skymoe.config import CONFIGS_DIR, ConfigError, PipelineConfig, ReaderConfig
from skymoe.pipeline import run_pipeline
from skymoe.stage import DoneRecords, StageRef, canonical_json, fingerprint, read_manifest
from skymoe.storage import Storage, join

log = logging.getLogger("skymoe.ablate")

ABLATION = "data-quality"
REPO = CONFIGS_DIR.parent
EVAL_DIR = REPO / "examples" / "quality" / "eval"
LANGS = ("zh", "en")
CORPUS_VERSION = "1"  # bump when build_corpus writes other bytes for the same inputs
HELD_OUT_VERSION = "1"  # bump when held_out_loss computes another number for the same weights
SHINGLE = 30  # characters; overlap rule as examples/quality/train/make_train.py
OVERLAP = 0.5  # share of the smaller document's shingles that makes two documents "the same text"

# Raw web text read from the shared data folder: (path below it, destination below the corpus, JSON text
# field or None for one document per line, JSON url field). Research-use data: read, never copied into the repo.
WEB_SOURCES = (
    ("web/chinesewebtext/2021-43_cleared1.jsonl", "chinesewebtext/2021-43_cleared1.jsonl", "raw_content", "url"),
    ("web/clue/CLUECorpusSmall_sampled.txt", "clue/CLUECorpusSmall_sampled.txt", None, None),
)
# Raw web documents read per file at each size (None: all): the smoke size keeps the test suite fast.
WEB_DOCS = {"smoke": 40, "cpu": None, "gpu": None}
# Held-out tokens scored per language at each size (None: all): whole documents in a fixed hashed order
# until the count is reached. One CPU forward pass over them per run.
HELD_OUT_TOKENS = {"smoke": 2048, "cpu": 32768, "gpu": None}


@dataclass(frozen=True)
class CleaningVariant:
    name: str
    description: str
    clean: dict[str, Any]  # nested overrides of the config's clean section


def cleaning_variants() -> list[CleaningVariant]:
    off = {"enabled": False}
    return [
        CleaningVariant("a-langid-exact", "language id + exact dedup only",
                        {"heuristics": off, "classifier": off, "structured": off,
                         "dedup": {"exact": True, "minhash": off, "recurring": off}}),
        CleaningVariant("b-heuristics-neardup", "(a) + heuristics, MinHash near-dup, recurring lines, structured share",
                        {"classifier": off, "dedup": {"exact": True}}),
        CleaningVariant("c-quality-models", "(b) + the per-language quality models (the config's full cleaning)",
                        {"dedup": {"exact": True}}),
    ]


# ----------------------------------------------------------------------------------- held-out text
@dataclass(frozen=True)
class HeldOutDoc:
    id: str
    lang: str
    source: str
    text: str


@dataclass(frozen=True)
class HeldOut:
    docs: tuple[HeldOutDoc, ...]
    shared: str | None  # the shared data folder the reference-only entries were read from, or None
    skipped: int  # good entries left out: reference-only and no shared data
    in_examples: int = 0  # good entries left out: also a quality model's training example

    @property
    def fingerprint(self) -> str:
        payload = canonical_json([[d.id, d.lang, d.text] for d in self.docs])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def by_lang(self) -> dict[str, list[HeldOutDoc]]:
        return {lang: [d for d in self.docs if d.lang == lang] for lang in LANGS}

    def describe(self) -> str:
        parts = []
        for lang, docs in self.by_lang().items():
            sources = defaultdict(int)
            for doc in docs:
                sources[doc.source.rsplit("/", 1)[-1]] += 1
            parts.append(f"{lang} {len(docs)} ({', '.join(f'{s} {n}' for s, n in sorted(sources.items()))})")
        where = f"reference-only entries read from {self.shared}" if self.shared else (
            f"shared data absent: only the entries stored with their text ({self.skipped} reference-only good "
            "entries left out)")
        examples = f"; {self.in_examples} left out because a quality model trains on them" if self.in_examples else ""
        return "; ".join(parts) + f"; {where}{examples}"


def shared_data() -> Path | None:
    """The shared data folder (``SKYMOE_SHARED_DATA``, else ``../shared/data`` beside the checkout), if present."""
    folder = Path(os.environ.get("SKYMOE_SHARED_DATA") or REPO.parent / "shared" / "data")
    return folder if (folder / "web").is_dir() else None


def held_out_documents(shared: Path | None, examples: list[str] = (), eval_dir: Path = EVAL_DIR,
                       storage: Storage | None = None) -> HeldOut:
    """The evaluation set's good, not borderline documents of both languages, less any that is also one
    of the quality models' training ``examples`` (JSONL files with ``text``): variant (c) would then be
    scored on text its filter was fitted to."""
    docs, skipped, lines_cache = [], 0, {}
    for lang in LANGS:
        for line in (eval_dir / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["label"] != "good" or entry.get("borderline"):
                continue
            text = entry.get("text")
            if text is None:
                if shared is None:
                    skipped += 1
                    continue
                text = _reference_text(entry, shared, lines_cache)
            if text.strip():
                docs.append(HeldOutDoc(entry["id"], lang, entry["source"], text))
    taken = set()
    if examples:
        index = OverlapIndex(tuple(docs))
        for uri in examples:
            text = storage.read_text(uri) if storage is not None else Path(uri).read_text(encoding="utf-8")
            for line in text.splitlines():
                if line.strip() and (match := index.match(json.loads(line).get("text") or "")) is not None:
                    taken.add(match.id)
        docs = [d for d in docs if d.id not in taken]
    if not all(any(d.lang == lang for d in docs) for lang in LANGS):
        raise ConfigError(f"the held-out set needs documents of {' and '.join(LANGS)} ({eval_dir})")
    return HeldOut(tuple(docs), str(shared) if shared else None, skipped, len(taken))


def _reference_text(entry: dict, shared: Path, cache: dict) -> str:
    """A reference-only entry's text: line ``line`` (1-based, split on \\n) of ``source``, field ``field``."""
    path = shared / entry["source"]
    if path not in cache:
        cache[path] = path.read_text(encoding="utf-8").split("\n")
    line = cache[path][entry["line"] - 1]
    return json.loads(line)[entry["field"]] if entry.get("field") else line


# ----------------------------------------------------------------------------------- overlap
def _normal(text: str) -> str:
    return " ".join(text.split())


def _shingles(text: str) -> set[int]:
    text = _normal(text)
    if len(text) <= SHINGLE:
        return {hash(text)}
    return {hash(text[i:i + SHINGLE]) for i in range(len(text) - SHINGLE + 1)}


class OverlapIndex:
    """Finds documents that are a held-out document (same text after whitespace normalization, or more
    than half of the smaller one's 30-character shingles in common). Hashes live in this process only."""

    def __init__(self, docs: tuple[HeldOutDoc, ...]):
        self.docs = docs
        self.exact = {_normal(d.text): i for i, d in enumerate(docs)}
        self.sizes = []
        self.index: dict[int, list[int]] = defaultdict(list)
        for i, doc in enumerate(docs):
            shingles = _shingles(doc.text)
            self.sizes.append(len(shingles))
            for h in shingles:
                self.index[h].append(i)

    def match(self, text: str) -> HeldOutDoc | None:
        normal = _normal(text)
        if normal in self.exact:
            return self.docs[self.exact[normal]]
        shingles = _shingles(text)
        hits: dict[int, int] = defaultdict(int)
        for h in shingles:
            for i in self.index.get(h, ()):
                hits[i] += 1
        for i, count in hits.items():
            if count > OVERLAP * min(len(shingles), self.sizes[i]):
                return self.docs[i]
        return None


# ----------------------------------------------------------------------------------- the raw corpus
@dataclass
class Corpus:
    uri: str  # the folder the clean stage reads
    fingerprint: str
    files: list[dict[str, Any]] = field(default_factory=list)  # per file: path, origin, docs, held_out_removed
    web: str | None = None  # the shared data folder the raw web text came from, or None
    web_docs: int | None = None  # raw web documents per file (None: all)


def build_corpus(config: PipelineConfig, storage: Storage, held_out: HeldOut, shared: Path | None,
                 web_docs: int | None) -> Corpus:
    """The raw corpus minus the held-out documents, written once under the root (a rerun finds it)."""
    from skymoe.pipelines.clean.readers import discover_inputs  # the clean stage's own input rules

    shards, _ = discover_inputs(storage, config.clean.inputs, config.clean.reader.text_field)
    bundled = {}  # uri -> (destination, format)
    for shard in shards:
        name = shard.uri.rsplit("/", 1)[-1]
        bundled.setdefault(shard.uri, (f"{shard.source}/{name}", shard.format, shard.checksum))
    web = []
    if shared is not None:
        web = [(str(shared / path), dest, text_field, url_field) for path, dest, text_field, url_field in WEB_SOURCES
               if (shared / path).is_file()]
    key = {"version": CORPUS_VERSION, "held_out": held_out.fingerprint, "text_field": config.clean.reader.text_field,
           "bundled": sorted((uri, dest, checksum) for uri, (dest, _, checksum) in bundled.items()),
           "web": [(dest, hashlib.sha256(Path(path).read_bytes()).hexdigest()) for path, dest, _, _ in web],
           "web_docs": web_docs}
    fp = hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()[:16]
    base = join(config.storage.root, "ablate", ABLATION, "corpus")
    corpus = Corpus(join(base, fp), fp, web=str(shared) if web else None, web_docs=web_docs)
    record_uri = join(base, f"{fp}.json")
    if storage.exists(record_uri):
        corpus.files = json.loads(storage.read_text(record_uri))["files"]
        return corpus
    index = OverlapIndex(held_out.docs)
    destinations = set()
    for uri, (dest, fmt, _) in sorted(bundled.items()):
        if fmt in ("jsonl", "text"):
            dest = dest.removesuffix(".gz")
            lines = _lines(storage, uri)
            stats = _write_filtered(storage, join(corpus.uri, dest), lines, fmt, config.clean.reader.text_field,
                                    index, None)
        else:  # WARC, Parquet: copied as they are (their documents are extracted by the clean stage)
            storage.write_bytes(join(corpus.uri, dest), storage.read_bytes(uri))
            stats = {"docs": None, "held_out_removed": 0}
        if dest in destinations:
            raise ConfigError(f"ablate {ABLATION}: two inputs map to the same corpus file {dest}; rename one")
        destinations.add(dest)
        corpus.files.append({"path": dest, "origin": uri, **stats})
    for path, dest, text_field, url_field in web:
        lines = iter(Path(path).read_text(encoding="utf-8").split("\n"))
        records = _web_records(lines, dest, text_field, url_field, config.clean.reader)
        stats = _write_filtered(storage, join(corpus.uri, dest), records, "jsonl" if text_field else "text",
                                config.clean.reader.text_field, index, web_docs)
        corpus.files.append({"path": dest, "origin": path, **stats})
    storage.write_text(record_uri, json.dumps({"key": key, "files": corpus.files}, indent=1, ensure_ascii=False))
    return corpus


def _lines(storage: Storage, uri: str) -> Iterator[str]:
    data = storage.read_bytes(uri)
    if uri.endswith(".gz"):
        data = gzip.decompress(data)
    return iter(data.decode("utf-8").split("\n"))


def _web_records(lines: Iterator[str], dest: str, text_field: str | None, url_field: str | None,
                 reader: ReaderConfig) -> Iterator[str]:
    """A raw web file's documents as corpus lines: JSONL records get an id, the text and the URL under the
    field names the clean stage's reader expects."""
    stem = dest.rsplit("/", 1)[-1].split(".", 1)[0]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if text_field is None:
            yield line
            continue
        record = json.loads(line)
        out = {reader.text_field: record.get(text_field) or ""}
        if reader.id_field:
            out[reader.id_field] = f"{stem}:{number}"
        if reader.url_field and url_field:
            out[reader.url_field] = record.get(url_field)
        yield json.dumps(out, ensure_ascii=False)


def _write_filtered(storage: Storage, uri: str, lines: Iterator[str], fmt: str, text_field: str,
                    index: OverlapIndex, limit: int | None) -> dict[str, int]:
    kept, removed, docs = [], 0, 0
    for line in lines:
        if not line.strip():
            continue
        if limit is not None and docs >= limit:
            break
        docs += 1
        text = line
        if fmt == "jsonl":
            try:
                text = json.loads(line).get(text_field)
            except (json.JSONDecodeError, AttributeError):
                text = None  # the clean stage rejects it as malformed, as it would the original
        if isinstance(text, str) and index.match(text) is not None:
            removed += 1
            continue
        kept.append(line)
    storage.write_text(uri, "\n".join(kept) + "\n")
    return {"docs": docs - removed, "held_out_removed": removed}


# ----------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class VariantData:
    variant: CleaningVariant
    config: PipelineConfig
    clean: StageRef
    tokens: StageRef
    clean_counts: dict[str, Any]
    tokens_counts: dict[str, Any]
    mixture: dict[str, Any]
    cached: tuple[bool, bool]  # clean, tokenize: found complete under the root (made by an earlier run)


@dataclass(frozen=True)
class DataQualityPlan(AblationPlan):
    corpus: Corpus | None = None
    held_out: HeldOut | None = None
    data: tuple[VariantData, ...] = ()
    tokenizer_uri: str = ""
    seq_len: int = 0
    budget_steps: int = 0


def check(config: PipelineConfig, seeds: int | None, size: str) -> None:
    """What can fail before any data is written: seeds, the cleaning the variants need, the train settings."""
    seeds = seeds_for(seeds, size)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    clean = config.clean
    missing = [what for what, on in (("clean.heuristics", clean.heuristics.enabled),
                                     ("clean.dedup.minhash", clean.dedup.minhash.enabled),
                                     ("clean.classifier", clean.classifier.enabled and clean.classifier.languages))
               if not on]
    if missing:
        raise ConfigError(f"ablate {ABLATION} compares cleaning steps the config turns off: {', '.join(missing)} "
                          "must be enabled")
    for lang in LANGS:
        if lang not in clean.language.keep:
            raise ConfigError(f"ablate {ABLATION} reports held-out loss for zh and en: clean.language.keep lacks {lang}")
    train = sized_train(config.train, SIZES[size])
    _variant(train, SIZES[size], "x").train_config(train, 0)


def _variant(train, size: Size, name: str) -> Variant:
    return Variant(name, True, _phase(size.moe_steps, train.dense.lr, train.dense.min_lr))


def variant_config(config: PipelineConfig, variant: CleaningVariant, corpus_uri: str,
                   tokenizer: str | None) -> PipelineConfig:
    values = config.model_dump(mode="json")
    values["clean"] = _merge(values["clean"], {**variant.clean, "inputs": [corpus_uri]})
    if tokenizer is not None:
        values["tokenize"]["tokenizer"]["path"] = tokenizer
    return PipelineConfig.model_validate(values)


def prepare_data(config: PipelineConfig, storage: Storage, size: str) -> tuple[Corpus, HeldOut, list[VariantData]]:
    """The held-out set, the raw corpus, and every variant's clean and tokenize outputs (cache hits when made)."""
    shared = shared_data()
    examples = [uri for side in config.clean.classifier.languages.values() for uri in (*side.positive, *side.negative)]
    held_out = held_out_documents(shared, examples, storage=storage)
    corpus = build_corpus(config, storage, held_out, shared, WEB_DOCS[size])
    log.info("ablate %s: held-out set %s; raw corpus %s (%s)", ABLATION, held_out.describe(), corpus.uri,
             "with raw web text from " + corpus.web if corpus.web else "bundled sources only: no shared data")
    index = OverlapIndex(held_out.docs)
    tokenizer = config.tokenize.tokenizer.path
    data = []
    for variant in cleaning_variants():
        vconfig = variant_config(config, variant, corpus.uri, tokenizer)
        results = run_pipeline(vconfig, storage, ("clean", "tokenize"))
        clean_ref, tokens_ref = (result.ref for result in results)
        if tokenizer is None:
            tokenizer = tokens_ref.path("tokenizer")  # variant (a)'s: every later variant tokenizes with it
        clean_manifest, tokens_manifest = read_manifest(storage, clean_ref), read_manifest(storage, tokens_ref)
        overlaps = tuple(_overlaps(storage, clean_ref, clean_manifest, index))
        if overlaps:
            raise ConfigError(f"ablate {ABLATION}: variant {variant.name}'s cleaned corpus holds held-out documents "
                              f"{overlaps[:5]}: the held-out loss would not be held out")
        data.append(VariantData(variant, vconfig, clean_ref, tokens_ref, clean_manifest.counts,
                                tokens_manifest.counts, tokens_manifest.extra["mixture"],
                                tuple(result.cached for result in results)))
    return corpus, held_out, data


def _overlaps(storage: Storage, ref: StageRef, manifest, index: OverlapIndex) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    for entry in manifest.shards:
        with storage.open_read(ref.path(entry["path"])) as handle:
            table = pq.read_table(handle, columns=["id", "text"])
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            match = index.match(text)
            if match is not None:
                yield match.id, doc_id


def plan_data_quality(config: PipelineConfig, storage: Storage, seeds: int | None, size_name: str) -> DataQualityPlan:
    """Data for every variant (made or found), then one run per (variant, seed): same model, same budget."""
    check(config, seeds, size_name)
    seeds = seeds_for(seeds, size_name)
    corpus, held_out, data = prepare_data(config, storage, size_name)
    size = SIZES[size_name]
    base = sized_train(config.train, size)
    tokens = {d.variant.name: read_manifest(storage, d.tokens) for d in data}
    shapes = {(int(m.extra["seq_len"]), int(m.extra["vocab_size"])) for m in tokens.values()}
    if len(shapes) != 1:
        raise ConfigError(f"ablate {ABLATION}: the variants' tokens differ in sequence length or vocabulary {shapes}")
    from skymoe.training.model import training_flops_per_token
    from skymoe.training.presets import dense_shape, with_moe
    from skymoe.training.runs import RUN_CODE_VERSION

    (seq_len, vocab), = shapes
    grid, runs = [], []
    for item in data:
        variant = _variant(base, size, item.variant.name)
        grid.append(variant)
        train = variant.train_config(base, 0)
        args = with_moe(dense_shape(train, seq_len, vocab), train.moe)
        settings = {"train": train.model_dump(mode="json", exclude=_NOT_FINGERPRINTED),
                    "phase": variant.phase.model_dump(mode="json"), "moe": True, "model": args.to_dict(),
                    "init": variant.init, "source_step": None}
        ref = StageRef(item.tokens.root, f"ablate/{ABLATION}",
                       fingerprint(f"ablate-{ABLATION}", RUN_CODE_VERSION, settings,
                                   {"tokenize": item.tokens.fingerprint}))
        runs += [AblationRun(ABLATION, variant, seed, ref, variant.train_config(base, seed), args, item.tokens.uri,
                             None) for seed in range(seeds)]
    tokens_per_step = base.micro_batch_size * base.grad_accum * base.parallel.world_size * seq_len
    dense = dense_shape(base, seq_len, vocab)
    flops = (training_flops_per_token(with_moe(dense, base.moe), seq_len), training_flops_per_token(dense, seq_len))
    return DataQualityPlan(ABLATION, size_name, seeds, data[0].tokens, tuple(grid), tuple(runs), tokens_per_step,
                           flops, corpus=corpus, held_out=held_out, data=tuple(data),
                           tokenizer_uri=data[0].tokens.path("tokenizer") if config.tokenize.tokenizer.path is None
                           else config.tokenize.tokenizer.path, seq_len=seq_len, budget_steps=size.moe_steps)


# ----------------------------------------------------------------------------------- held-out loss
def held_out_record(storage: Storage, plan: DataQualityPlan, run: AblationRun) -> dict[str, Any]:
    """The run's held-out loss per language, computed once from its final weights (a done-record per seed)."""
    records = DoneRecords(storage, run.ref, f"held-out-{plan.held_out.fingerprint}-{HELD_OUT_TOKENS[plan.size]}"
                                            f"-v{HELD_OUT_VERSION}")
    record = records.get(run.key)
    if record is None:
        if done_record(storage, run) is None:
            raise ConfigError(f"{run.label}: not trained yet")
        record = held_out_loss(storage, join(run.uri, "final", "weights"), plan.tokenizer_uri, plan.held_out,
                               plan.seq_len, HELD_OUT_TOKENS[plan.size])
        records.mark(run.key, record)
    return record


def held_out_loss(storage: Storage, weights_uri: str, tokenizer_uri: str, held_out: HeldOut, seq_len: int,
                  max_tokens: int | None = None, batch: int = 8) -> dict[str, dict[str, float]]:
    """Mean next-token loss per language over the held-out documents, each followed by EOS as in
    training, packed into rows of ``seq_len + 1`` (the last row shorter); one process, no token dropped
    by expert capacity (evaluation routing). With ``max_tokens``, whole documents in the order of a hash
    of their ids until that many tokens (the same documents for every run)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from skymoe.pipelines.tokenize.tokenizer import load_tokenizer_folder
    from skymoe.training.model import Transformer
    from skymoe.training.weights import load_args, load_state

    folder = load_tokenizer_folder(storage, tokenizer_uri)  # the tokenizer's own EOS, whatever its name
    tokenizer, eos = folder.tokenizer, folder.eos_id
    model = Transformer(load_args(storage, weights_uri))
    model.load_state_dict(load_state(storage, weights_uri))
    model.eval()
    out = {}
    for lang, docs in held_out.by_lang().items():
        docs = sorted(docs, key=lambda d: hashlib.sha256(d.id.encode("utf-8")).hexdigest())
        encoded = [(*enc.ids, eos) for enc in tokenizer.encode_batch_fast([d.text for d in docs])]
        if max_tokens is not None:
            ends = np.cumsum([len(ids) for ids in encoded])
            keep = int(np.searchsorted(ends, max_tokens)) + 1  # the document that reaches the count is whole
            docs, encoded = docs[:keep], encoded[:keep]
        stream = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64)
        rows = [stream[start:start + seq_len + 1] for start in range(0, len(stream) - 1, seq_len)]
        full = [r for r in rows if len(r) == seq_len + 1]
        batches = [np.stack(full[i:i + batch]) for i in range(0, len(full), batch)] + \
                  [r[None] for r in rows if 1 < len(r) < seq_len + 1]
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in batches:
                ids = torch.from_numpy(ids)
                logits = model(ids[:, :-1])
                total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += ids[:, 1:].numel()
        out[lang] = {"loss": total / count, "tokens": count, "docs": len(docs)}
    return out


# ----------------------------------------------------------------------------------- report
REFERENCE = "reference (first variant)"
EXPECTED = (("b-heuristics-neardup", "a-langid-exact"), ("c-quality-models", "b-heuristics-neardup"),
            ("c-quality-models", "a-langid-exact"))


def corpora_table(plan: DataQualityPlan) -> list[dict[str, Any]]:
    """Per variant: documents in and kept (per language), training tokens, and how often the budget repeats them."""
    budget = plan.budget_steps * plan.tokens_per_step
    rows = []
    for item in plan.data:
        epoch = sum(d["realised_tokens"] for d in item.mixture.values())
        by_lang = item.clean_counts.get("docs_out_by_lang", {})
        shares = defaultdict(int)
        for domain, mix in item.mixture.items():
            shares[domain.split("/", 1)[0]] += mix["realised_tokens"]
        rows.append({"variant": item.variant.name, "cleaning": item.variant.description,
                     "docs in": item.clean_counts["docs_in"], "docs kept": item.clean_counts["docs_out"],
                     **{f"kept {lang}": n for lang, n in sorted(by_lang.items())},
                     "training tokens (unique)": item.tokens_counts.get("train_tokens", 0),
                     "tokens per epoch (mixture)": epoch, "epochs in the budget": f"{budget / epoch:.2f}",
                     "language shares": ", ".join(f"{lang} {n / epoch:.0%}" for lang, n in sorted(shares.items()))})
    keys = list(dict.fromkeys(key for row in rows for key in row))  # a language one variant lacks: 0 there
    return [{key: row.get(key, 0) for key in keys} for row in rows]


def build_report(plan: DataQualityPlan, storage: Storage, records: dict[tuple[str, int], dict], trained: list[str]):
    """Tables (corpora, held-out loss per variant and language), verdicts and the plot."""
    from skymoe.ablations.report import (VERDICT_RULES, Report, _markdown_table, _tail, compare, findings_table,
                                        histories, spread)

    names = [v.name for v in plan.variants]
    losses = {(name, lang): [records[(name, seed)]["held_out"][lang]["loss"] for seed in range(plan.seeds)]
              for name in names for lang in LANGS}
    runs = histories(storage, plan)
    budget = plan.budget_steps * plan.tokens_per_step
    corpora = corpora_table(plan)
    table, findings = [], []
    for lang in LANGS:
        for index, name in enumerate(names):
            values = losses[(name, lang)]
            mean, std = spread(values)
            row = {"variant": name, "language": lang, "seeds": len(values),
                   "held-out loss": f"{mean:.4f} ± {std:.2g}", "per seed": ", ".join(f"{v:.4f}" for v in values),
                   "final train loss (own data)": "{:.4f} ± {:.2g}".format(*spread([_tail(r, "loss") for r in runs[name]]))}
            if index == 0:
                row.update({"vs": "", "difference": "", "verdict": REFERENCE})
            else:
                previous = names[index - 1]
                verdict = compare(f"{lang}: {name} has a lower held-out loss than {previous}", name, values,
                                  previous, losses[(previous, lang)], "lower", "held-out loss")
                row.update({"vs": previous, "difference": f"{mean - spread(losses[(previous, lang)])[0]:+.4f}",
                            "verdict": verdict["status"]})
            table.append(row)
        for better, worse in EXPECTED:
            findings.append(compare(f"{lang}: cleaning variant {better} gives a lower held-out {lang} loss than "
                                    f"{worse}", better, losses[(better, lang)], worse, losses[(worse, lang)],
                                    "lower", f"held-out {lang} loss"))
    seconds = sum(record["seconds"] for record in records.values())
    title = f"Ablation {plan.ablation} ({plan.size} size, {plan.seeds} seed{'s' * (plan.seeds > 1)})"
    corpus, held_out = plan.corpus, plan.held_out
    scored = records[(names[0], 0)]["held_out"]
    sources = ", ".join(f"`{f['path']}` ({'copied' if f['docs'] is None else f['docs']}"
                        + (f", {f['held_out_removed']} held-out removed" if f["held_out_removed"] else "") + ")"
                        for f in corpus.files)
    web = (f"raw web text from `{corpus.web}`" + (f" (first {corpus.web_docs} documents per file)"
                                                  if corpus.web_docs else "")
           if corpus.web else "**no shared data folder: the bundled sources only** (set SKYMOE_SHARED_DATA to add "
                              "raw web text), so there is less junk to remove than intended")
    lines = [
        f"# {title}", "",
        "Same model, same seeds and the same number of training tokens on three cleanings of one raw corpus; "
        "scored by next-token loss on held-out clean text per language.", "",
        "## Set-up", "",
        f"- Raw corpus `{corpus.uri}`: the config's inputs and {web}. Files (documents written): {sources}.",
        f"- Held-out clean text: the quality evaluation set's documents labelled good and not borderline "
        f"(`examples/quality/eval/`): {held_out.describe()}. Every one is taken out of the raw corpus, and no "
        "variant's cleaned corpus holds any of them (same text, or more than half of the smaller document's "
        f"{SHINGLE}-character shingles; checked for every cleaned document). Scored: "
        + ", ".join(f"{lang} {scored[lang]['docs']} documents, {scored[lang]['tokens']:,} tokens" for lang in LANGS)
        + (f" (whole documents in a fixed hashed order up to {HELD_OUT_TOKENS[plan.size]:,} tokens per language)"
           if HELD_OUT_TOKENS[plan.size] else "") + ".",
        f"- One tokenizer for all variants: `{plan.tokenizer_uri}`.",
        f"- Budget: {plan.budget_steps} steps x {plan.tokens_per_step:,} tokens = {budget:,} training tokens for "
        "every run; a variant with fewer tokens repeats its data more often (`epochs in the budget`), within the "
        "tokenize stage's language mixture.",
        f"- {len(plan.runs)} runs ({len(plan.runs) - len(trained)} cached, {len(trained)} trained now); "
        f"{seconds / 60:.1f} minutes of training in all. Seed s gives every variant the same initial weights and "
        "data order, so the comparisons are paired.", "",
        "## Corpora", "", _markdown_table(corpora), "",
        "## Held-out loss", "", _markdown_table(table), "",
        "## Findings", "", VERDICT_RULES, "", findings_table(findings), "",
    ]
    lines += ["- Not measured: the evaluate stage's benchmark scores. That stage evaluates a train stage's export, "
              "not ablation runs, and at this model size and budget the scores are expected at chance level, "
              "where three cleanings could not be told apart.",
              "", "## Plots", "", "![held-out loss](plots/held-out-loss.png)"]
    plots = {"held-out-loss.png": _plot(names, losses, plan.seeds)}
    return Report(title, "\n".join(lines) + "\n", plots, table, findings)


def _plot(names: list[str], losses: dict[tuple[str, str], list[float]], seeds: int) -> bytes:
    """Held-out loss per variant, one panel per language; each seed a point, seeds joined across variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skymoe.plots import figure_png

    fig, axes = plt.subplots(1, len(LANGS), figsize=(6.5 * len(LANGS), 4))
    for ax, lang in zip(axes, LANGS):
        for seed in range(seeds):
            ax.plot(range(len(names)), [losses[(n, lang)][seed] for n in names], "o-", color=f"C{seed}", alpha=0.7,
                    lw=0.8, ms=6, label=f"seed {seed}")
        means = [statistics.fmean(losses[(n, lang)]) for n in names]
        ax.plot(range(len(names)), means, "_", color="black", ms=30, mew=2, label="mean")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(f"held-out {lang} loss")
        ax.set_ylabel("next-token loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_png(fig, dpi=90)
