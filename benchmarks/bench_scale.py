"""Scale benchmark: ``skymoe run --until tokenize`` on corpora of growing size with planted duplicates,
and datatrove's own pipeline on the same input side by side (issue 13).

Corpus (built once per (N, shard size, seed, zh share) and cached under ``--workdir``):
- real sentences: English from ``examples/corpus/c4`` and ``dolma`` (6-60 words, ending in . ! or ?),
  Chinese from ``zhwiki`` and ``cmrc2018`` (12-200 characters, ending in 。！？, mostly Han, no kana);
  sentences with a spam term of ``configs/blocklists`` or C4 line-rule triggers (javascript, lorem
  ipsum, curly brackets, cookie/privacy notices, URLs) are left out of the pools;
- every base document is drawn from its own seeded generator: language (``--zh-share``, default 0.3),
  length in sentences (log-normal, median 16 en / 18 zh, 6-120), sentences without repeats, grouped
  into paragraphs (lines) of 2-6 sentences - web-page-like lengths that mostly pass the filters;
- 5% exact duplicates: a copy of an earlier base document (verbatim, or with whitespace or letter-case
  changes that the normalized exact hash ignores); 5% near duplicates: an earlier base document with a
  few words (Chinese: characters) replaced, about one per 125 shingles, or one sentence appended, kept
  only when the 5-gram Jaccard with the original is >= 0.85 (else a single word is replaced: very short
  documents then fall a little below; the Jaccard of every pair is in the truth). Each original is
  copied at most once, so the planted truth is a set of disjoint pairs (``truth.tsv``: duplicate id,
  original id, kind, variant, Jaccard). Ids are ``en-00000042`` / ``zh-...`` (the language, the position);
- JSONL.gz shards of ``--shard-docs`` records ``{"id", "text"}`` in ``input/web/``.

skymoe: a generated YAML that ``extends: tiny`` and sets the root, the inputs, ``clean.executor``
(``--executor``, ``--workers``), the quality classifier off (the documents are sentences of real pages
stitched together, which a quality model judges regardless of duplicates, so it would only thin the
planted pairs; ``--classifier`` keeps it on) and
``tokenize.tokenizer.path`` = a byte-level BPE (tiny's vocab_size) trained beforehand on 5,000 base
documents, so tokenizer training is not timed. Run as ``skymoe run --config <yaml> --until tokenize
--json`` in a subprocess, into a fresh root each time. Phase times are the stage manifests' ``timings``
(every phase found there, ordered by the time its done-records were written); docs/s = documents the
stage read / phase seconds (tokenize: the cleaned documents). "skymoe run" is the command's wall time,
Prefect's ephemeral server start included.

datatrove 0.10.1, same input and worker count, in a subprocess of this script; its stages as its
``examples/minhash_deduplication.py`` chains them after a base processing step:
(1) JsonlReader(gzip) -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter ->
    FineWebQualityFilter (default arguments, English word tokenizer) -> JsonlWriter (the filtered
    corpus) -> MinhashDedupSignature, one task per shard;
(2) MinhashDedupBuckets, one task per band; (3) MinhashDedupCluster (save_cluster_id), one task;
(4) JsonlReader(filtered) -> MinhashDedupFilter(exclusion_writer=JsonlWriter, load_cluster_ids) ->
    ParquetWriter, one task per shard.
MinHash at skymoe's settings (5-grams, 14 bands x 8 rows, seed 1); its xxhash64 shingle hash gets the
n-gram's UTF-8 bytes (datatrove 0.10.1 passes a str, which xxhash >= 4 rejects). Caveat: datatrove's
filters and MinHash use the English word tokenizer for every document; Chinese comes out as a few long
"words" per clause, so its Gopher/C4 rules reject every Chinese document (its kept counts per language
are printed) - early in its chain, while skymoe identifies languages (lingua) and runs its Chinese rules
on them: datatrove does less work per Chinese document. Its time = the sum of the four
``executor.run()`` calls (imports not counted).

Peak RSS: the subprocess's process tree is polled every 0.2 s (psutil). Coordinator = the top process
(the ``skymoe`` command; for datatrove the child running its executors); workers = its Python
descendants except helpers: Prefect's ephemeral server, multiprocess's resource tracker and forkserver,
and the multiprocess Manager (a fork of the coordinator, same command line); with ``--executor ray`` the
Ray task processes (``ray::...``) are the workers and raylet/GCS/dashboard are helpers. A phase that
the stage runs in its own process (datatrove executor: fewer than 2 shards per worker) has no worker. Per phase: the
largest RSS sampled while it ran (phase end = its last done-record's mtime, start = end - seconds).
Also the coordinator's VmHWM (kernel high-water mark) as last read before it exited.

Duplicate precision/recall against the planted pairs, from the rejects (skymoe: ``rejects/*.parquet``
``id, step, reason``; a drop is a reject whose step contains ``dedup``, its partner the document named
in the reason ``...duplicate_of: <shard>/<row>`` resolved through ``filtered/<shard>.parquet``;
datatrove: the documents its exclusion writer wrote, partner = the kept member of the same cluster):
- a pair is *eligible* when both its documents survived the per-document filters (and, with
  ``--classifier``, the quality thresholds), i.e. reached dedup;
  it is *recalled* when one of the two was dropped as a duplicate of the other. Recall = recalled /
  eligible pairs (per kind too; near pairs also per Jaccard band);
- precision vs planted = drops whose partner is their planted pair / all drops; verified precision
  also counts a drop as right when the 5-gram shingle Jaccard of the two input texts is >= 0.7
  (natural near-duplicates in the sentence pools). A drop whose partner cannot be resolved counts as
  planted-right when its pair is eligible (the number of such drops is printed).

Targets (printed beside the figures, never asserted): clean + tokenize time grows no faster than
N^1.05 (fitted exponent of log time vs log N over the sizes run); coordinator peak RSS at the largest N
within 1.2x of the smallest; largest worker's RSS flat (within 1.2x); at ``--datatrove-at``: skymoe's
clean stage >= 2x datatrove's docs/s at equal workers, duplicate precision >= 0.99, recall no lower
than datatrove's.

Run: ``python benchmarks/bench_scale.py [--sizes 20000,100000,500000] [--big] [--workers 2]
[--executor datatrove|ray] [--shard-docs 5000] [--datatrove-at 100000] [--skip-datatrove]
[--repeats 1] [--workdir /tmp/skymoe-bench-scale] [--json FILE]``; ``--sizes 5000,20000
--datatrove-at 20000`` is a quick check. Measured on 2 otherwise idle cores, 2 workers (47b0411):
skymoe's clean stage 211-247 docs/s (20k: 95 s, 100k: 420 s, 500k: 2,028 s; the whole command 2, 8 and
39 min), datatrove's pipeline 64 docs/s at 20k (311 s; 15-34 docs/s on a loaded machine), so the
default side by side at 100k takes about half an hour for datatrove alone. Building a corpus takes
~50 s per 100k.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus"
BLOCKLISTS = ROOT / "configs" / "blocklists"
CORPUS_VERSION = 1  # bump when the builder changes: cached corpora are keyed by it
EXACT_SHARE = NEAR_SHARE = 0.05
NGRAM, BANDS, ROWS, MINHASH_SEED = 5, 14, 8, 1  # skymoe's defaults (tiny preset), given to datatrove too
MIN_NEAR_JACCARD = 0.85
VERIFY_JACCARD = 0.7
TOKENIZER_DOCS = 5000
POLL_S = 0.2
JACCARD_BANDS = ((0.85, 0.9), (0.9, 0.95), (0.95, 1.01))
PHASE_ORDER = ("classifier", "filter", "index", "decide", "apply", "tokenizer", "encode")

_EN_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"“‘(])")
_ZH_SPLIT = re.compile(r"(?<=[。！？])")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_ALPHA_WORD = re.compile(r"^[A-Za-z]{3,}$")
_BAD = ("javascript", "lorem ipsum", "{", "}", "cookie", "terms of use", "privacy policy", "http", "www.", "@",
        "...", "…", "|", "#")


# ------------------------------------------------------------------------------ sentence pools
def _blocklist(lang: str) -> list[str]:
    lines = (BLOCKLISTS / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip().lower() for line in lines if line.strip() and not line.startswith("#")]


def _clean_sentence(sentence: str, terms: list[str]) -> bool:
    lower = sentence.lower()
    return not any(bad in lower for bad in _BAD) and not any(term in lower for term in terms)


def sentence_pools() -> dict[str, list[str]]:
    """Real sentences per language, deduplicated, in file order (see the module docstring)."""
    en, zh = [], []
    for path in (CORPUS / "c4" / "c4_demo.jsonl", CORPUS / "dolma" / "cc_en_head-0091.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            for para in json.loads(line)["text"].split("\n"):
                en += _EN_SPLIT.split(para.strip())
    zh_texts = (CORPUS / "zhwiki" / "zhwiki_part1.txt").read_text(encoding="utf-8").splitlines()
    zh_texts += [json.loads(line)["text"] for line in
                 (CORPUS / "cmrc2018" / "cmrc2018_contexts.jsonl").read_text(encoding="utf-8").splitlines()]
    for text in zh_texts:
        zh += [s.strip() for s in _ZH_SPLIT.split(text)]
    en_terms, zh_terms = _blocklist("en"), _blocklist("zh")
    pools = {
        "en": [s for s in en if 6 <= len(s.split()) <= 60 and s[-1] in ".!?" and _clean_sentence(s, en_terms)],
        "zh": [s for s in zh if 12 <= len(s) <= 200 and s[-1] in "。！？" and len(_HAN.findall(s)) >= 0.6 * len(s)
               and not _KANA.search(s) and _clean_sentence(s, zh_terms)],
    }
    return {lang: list(dict.fromkeys(sentences)) for lang, sentences in pools.items()}


# ------------------------------------------------------------------------------ shingles
def shingles(text: str, lang: str) -> set:
    """5-gram shingles: lower-cased words (en) or non-space characters (zh), as skymoe's MinHash reads them."""
    tokens = [c for c in text if not c.isspace()] if lang == "zh" else _WORD.findall(text.lower())
    if len(tokens) < NGRAM:
        return {tuple(tokens)}
    return {tuple(tokens[i:i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def lang_of(doc_id: str) -> str:
    return doc_id.split("-", 1)[0]


# ------------------------------------------------------------------------------ corpus builder
class DocMaker:
    """Base documents from their own seeded generator (so a copy can regenerate its original) and the
    planted exact and near copies."""

    def __init__(self, pools: dict[str, list[str]], seed: int, zh_share: float):
        self.pools, self.seed, self.zh_share = pools, seed, zh_share
        self.median = {"en": 16, "zh": 18}

    def base(self, i: int) -> tuple[str, str]:
        rng = random.Random(f"{self.seed}:base:{i}")
        lang = "zh" if rng.random() < self.zh_share else "en"
        pool = self.pools[lang]
        count = min(120, max(6, int(rng.lognormvariate(math.log(self.median[lang]), 0.7))))
        sentences = [pool[k] for k in rng.sample(range(len(pool)), count)]
        paragraphs, start = [], 0
        while start < count:
            size = rng.randint(2, 6)
            if count - (start + size) == 1:
                size += 1  # no one-sentence paragraph at the end
            paragraphs.append(sentences[start:start + size])
            start += size
        sep = "" if lang == "zh" else " "
        return lang, "\n".join(sep.join(p) for p in paragraphs)

    def exact_copy(self, i: int, text: str, lang: str) -> tuple[str, str]:
        """Verbatim, or whitespace / letter-case changes (equal after NFKC, lower case, no whitespace)."""
        rng = random.Random(f"{self.seed}:exact:{i}")
        variant = rng.choice(("verbatim", "whitespace", "case") if lang == "en" else ("verbatim", "whitespace"))
        if variant == "whitespace":
            chars = list(text)
            spots = [k for k, c in enumerate(chars) if c in " ，、"] or [len(chars) - 1]
            for k in rng.sample(spots, min(3, len(spots))):
                chars[k] += " "
            return "".join(chars).replace("\n", " \n", 1) + " ", variant
        if variant == "case":
            lines = text.split("\n")
            for k in rng.sample(range(len(lines)), min(2, len(lines))):
                lines[k] = lines[k][:1].lower() + lines[k][1:]
            words = lines[-1].split(" ")
            k = rng.randrange(len(words))
            words[k] = words[k].upper()
            lines[-1] = " ".join(words)
            return "\n".join(lines), variant
        return text, variant

    def near_copy(self, i: int, text: str, lang: str) -> tuple[str, str, float]:
        """A few words (characters) replaced, or one sentence appended; Jaccard >= 0.85 or one word replaced."""
        rng = random.Random(f"{self.seed}:near:{i}")
        original = shingles(text, lang)
        variant = "append" if rng.random() < 0.5 and len(original) >= 200 else "replace"
        edits = max(1, round(len(original) / 125))
        copy = self._append(rng, text, lang) if variant == "append" else self._replace(rng, text, lang, edits)
        score = jaccard(original, shingles(copy, lang))
        if score < MIN_NEAR_JACCARD:
            variant, copy = "replace1", self._replace(rng, text, lang, 1)
            score = jaccard(original, shingles(copy, lang))
        return copy, variant, score

    def _append(self, rng: random.Random, text: str, lang: str) -> str:
        lines = text.split("\n")
        k = rng.randrange(len(lines))
        lines[k] += ("" if lang == "zh" else " ") + rng.choice(self.pools[lang])
        return "\n".join(lines)

    def _replace(self, rng: random.Random, text: str, lang: str, edits: int) -> str:
        donor = rng.choice(self.pools[lang])
        if lang == "zh":
            chars = list(text)
            spots = [k for k, c in enumerate(chars) if _HAN.match(c)]
            fill = _HAN.findall(donor) or ["的"]
            for k in rng.sample(spots, min(edits, len(spots))):
                chars[k] = rng.choice([c for c in fill if c != chars[k]] or ["之"])
            return "".join(chars)
        lines = [line.split(" ") for line in text.split("\n")]
        spots = [(a, b) for a, words in enumerate(lines) for b, w in enumerate(words) if _ALPHA_WORD.match(w)]
        fill = [w for w in donor.split(" ") if _ALPHA_WORD.match(w)] or ["house", "river", "market"]
        for a, b in rng.sample(spots, min(edits, len(spots))):
            lines[a][b] = rng.choice([w for w in fill if w.lower() != lines[a][b].lower()] or ["garden"])
        return "\n".join(" ".join(words) for words in lines)


@dataclass
class Corpus:
    folder: Path
    n: int
    shard_docs: int

    @property
    def input_dir(self) -> Path:
        return self.folder / "input"

    @property
    def shard_dir(self) -> Path:
        return self.folder / "input" / "web"

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_docs)

    def shard_path(self, s: int) -> Path:
        return self.shard_dir / f"part-{s:05d}.jsonl.gz"


def plan_duplicates(n: int, seed: int) -> dict[int, str]:
    """Position -> "exact" / "near" for the planted copies (never position 0)."""
    rng = random.Random(f"{seed}:plan:{n}")
    n_exact, n_near = round(n * EXACT_SHARE), round(n * NEAR_SHARE)
    positions = rng.sample(range(1, n), min(n - 1, n_exact + n_near)) if n > 1 else []
    return {p: ("exact" if k < n_exact else "near") for k, p in enumerate(positions)}


def build_corpus(workdir: Path, n: int, shard_docs: int, seed: int, zh_share: float) -> Corpus:
    """The cached corpus for these settings, built when missing (shards, truth.tsv, meta.json)."""
    key = f"n{n}-shard{shard_docs}-seed{seed}-zh{zh_share:g}-v{CORPUS_VERSION}"
    corpus = Corpus(workdir / "corpus" / key, n, shard_docs)
    if (corpus.folder / "COMPLETE").exists():
        print(f"corpus {key}: cached at {corpus.folder}")
        return corpus
    shutil.rmtree(corpus.folder, ignore_errors=True)
    corpus.shard_dir.mkdir(parents=True)
    started = time.monotonic()
    pools = sentence_pools()
    maker = DocMaker(pools, seed, zh_share)
    kinds = plan_duplicates(n, seed)
    rng = random.Random(f"{seed}:originals:{n}")
    unused: list[int] = []  # earlier base positions not yet copied
    langs: list[str] = []
    truth_rows = []
    for s in range(corpus.shards):
        with gzip.open(corpus.shard_path(s).with_suffix(".tmp"), "wt", encoding="utf-8", compresslevel=6) as out:
            for i in range(s * shard_docs, min(n, (s + 1) * shard_docs)):
                kind = kinds.get(i) if unused else None
                if kind is None:
                    lang, text = maker.base(i)
                    unused.append(i)
                else:
                    k = rng.randrange(len(unused))
                    original, unused[k] = unused[k], unused[-1]
                    unused.pop()
                    lang, base_text = maker.base(original)
                    if kind == "exact":
                        (text, variant), score = maker.exact_copy(i, base_text, lang), 1.0
                    else:
                        text, variant, score = maker.near_copy(i, base_text, lang)
                    truth_rows.append(f"{lang}-{i:08d}\t{lang}-{original:08d}\t{kind}\t{variant}\t{score:.4f}")
                langs.append(lang)
                out.write(json.dumps({"id": f"{lang}-{i:08d}", "text": text}, ensure_ascii=False) + "\n")
        corpus.shard_path(s).with_suffix(".tmp").rename(corpus.shard_path(s))
        if (s + 1) % 20 == 0:
            print(f"  building corpus {key}: {s + 1}/{corpus.shards} shards, {time.monotonic() - started:.0f}s",
                  flush=True)
    (corpus.folder / "langs.txt").write_text("".join(lang[0] for lang in langs))
    (corpus.folder / "truth.tsv").write_text("dup_id\toriginal_id\tkind\tvariant\tjaccard\n" + "\n".join(truth_rows)
                                             + "\n", encoding="utf-8")
    meta = {"n": n, "shard_docs": shard_docs, "seed": seed, "zh_share": zh_share, "version": CORPUS_VERSION,
            "pool_sentences": {lang: len(p) for lang, p in pools.items()}, "langs": dict(Counter(langs)),
            "planted": dict(Counter(row.split("\t")[2] for row in truth_rows)),
            "bytes": sum(corpus.shard_path(s).stat().st_size for s in range(corpus.shards))}
    (corpus.folder / "meta.json").write_text(json.dumps(meta, indent=1))
    (corpus.folder / "COMPLETE").write_text("")
    print(f"corpus {key}: built in {time.monotonic() - started:.0f}s at {corpus.folder}")
    return corpus


@dataclass(frozen=True)
class Pair:
    dup: str
    original: str
    kind: str
    variant: str
    jaccard: float


def load_truth(corpus: Corpus) -> list[Pair]:
    rows = (corpus.folder / "truth.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [Pair(d, o, k, v, float(j)) for d, o, k, v, j in (row.split("\t") for row in rows if row)]


def corpus_meta(corpus: Corpus) -> dict:
    return json.loads((corpus.folder / "meta.json").read_text())


def corpus_texts(corpus: Corpus, ids: set[str]) -> dict[str, str]:
    """Input texts of the given ids, reading only the shards that hold them."""
    wanted = sorted({int(doc_id.split("-", 1)[1]) // corpus.shard_docs for doc_id in ids})
    texts = {}
    for s in wanted:
        with gzip.open(corpus.shard_path(s), "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record["id"] in ids:
                    texts[record["id"]] = record["text"]
    return texts


def ensure_tokenizer(workdir: Path, seed: int, zh_share: float, vocab_size: int) -> Path:
    """A byte-level BPE trained once (cached) on the first base documents, with skymoe's trainer."""
    folder = workdir / f"tokenizer-seed{seed}-zh{zh_share:g}-v{CORPUS_VERSION}-vocab{vocab_size}"
    if (folder / "tokenizer.json").exists():
        return folder
    from skymoe.pipelines.tokenize.tokenizer import save_tokenizer, train_tokenizer
    from skymoe.storage import Storage

    started = time.monotonic()
    maker = DocMaker(sentence_pools(), seed, zh_share)
    tokenizer = train_tokenizer((maker.base(i)[1] for i in range(TOKENIZER_DOCS)), vocab_size)
    save_tokenizer(tokenizer, Storage(), str(folder))
    print(f"tokenizer: trained on {TOKENIZER_DOCS} base documents in {time.monotonic() - started:.1f}s "
          f"({tokenizer.get_vocab_size()} ids; not timed) at {folder}")
    return folder


# ------------------------------------------------------------------------------ process-tree sampling
class TreeSampler:
    """Polls a process tree: RSS of the top process (coordinator), of its largest worker, of helpers."""

    def __init__(self, pid: int, ray: bool = False):
        import psutil

        self.psutil = psutil
        self.top = psutil.Process(pid)
        self.top_cmd = self._cmdline(self.top)
        self.ray = ray
        self.started = time.time()
        self.samples: list[tuple[float, int, int]] = []  # (time, coordinator rss, largest worker rss)
        self.kind_of: dict[int, str] = {}
        self.peak_by_kind: Counter = Counter()
        self.workers_seen: set[int] = set()
        self.hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _cmdline(proc) -> str:
        try:
            return " ".join(proc.cmdline())
        except Exception:
            return ""

    def _classify(self, proc, cmd: str) -> str:
        if "uvicorn" in cmd or "prefect.server" in cmd:
            return "Prefect server"
        if "resource_tracker" in cmd or "semaphore_tracker" in cmd:
            return "multiprocess resource tracker"
        try:
            parent = proc.ppid()
        except self.psutil.Error:
            parent = -1
        if "forkserver import main" in cmd and parent == self.top.pid:
            return "multiprocess forkserver"
        if cmd == self.top_cmd and parent == self.top.pid:
            return "multiprocess Manager (fork of the coordinator)"
        if cmd.startswith("ray::") or "default_worker.py" in cmd:  # a Ray worker, before or after its retitle
            return "worker"
        if any(name in cmd for name in ("raylet", "gcs_server", "ray/dashboard", "log_monitor", "ray/_private",
                                        "runtime_env", "ray_client_server", "monitor.py")):
            return "Ray system"
        program = os.path.basename(cmd.split(" ", 1)[0])
        if "python" not in program:
            return f"other ({program})"  # short-lived commands (a shell, git, ...), not workers
        return "worker"

    def _processes(self) -> list:
        procs = self.top.children(recursive=True)
        if self.ray:  # Ray workers may be reparented away from the raylet: find them by title too
            known = {p.pid for p in procs}
            for p in self.psutil.process_iter(["cmdline", "create_time"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid not in known and cmd.startswith("ray::") and (p.info["create_time"] or 0) >= self.started - 1:
                    procs.append(p)
        return procs

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(POLL_S)

    def _sample(self) -> None:
        try:
            coordinator = self.top.memory_info().rss
            with open(f"/proc/{self.top.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_kb = int(line.split()[1])
            procs = self._processes()
        except (self.psutil.Error, OSError):
            return
        largest = 0
        for proc in procs:
            try:
                if proc.pid not in self.kind_of:
                    cmd = self._cmdline(proc)
                    if not cmd:
                        continue  # exiting: classify it when (if) its command line is readable
                    self.kind_of[proc.pid] = self._classify(proc, cmd)
                kind = self.kind_of[proc.pid]
                rss = proc.memory_info().rss
            except self.psutil.Error:
                continue
            self.peak_by_kind[kind] = max(self.peak_by_kind[kind], rss)
            if kind == "worker":
                self.workers_seen.add(proc.pid)
                largest = max(largest, rss)
        self.samples.append((time.time(), coordinator, largest))

    def peak(self, start: float = 0.0, end: float = float("inf")) -> tuple[int, int]:
        """(coordinator, largest worker) peak RSS in bytes over samples in [start, end]."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        return (max((s[1] for s in inside), default=0), max((s[2] for s in inside), default=0))


@dataclass
class Monitored:
    rc: int
    wall: float
    stdout: str
    stderr_tail: list[str]
    sampler: TreeSampler


def run_monitored(cmd: list[str], log_path: Path, relay_stderr: bool, ray: bool = False,
                  env: dict | None = None) -> Monitored:
    """Run ``cmd``, sampling its process tree; stderr goes to ``log_path`` (and to our stdout, indented,
    when ``relay_stderr``); stdout lines that start with ``progress:`` are relayed, all of it returned."""
    tail: list[str] = []
    out_lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env, bufsize=1)
    sampler = TreeSampler(proc.pid, ray=ray)

    def pump_stderr() -> None:
        with open(log_path, "w") as log:
            for line in proc.stderr:
                log.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-60]
                if relay_stderr:
                    print(f"    | {line.rstrip()}", flush=True)

    def pump_stdout() -> None:
        for line in proc.stdout:
            out_lines.append(line)
            if line.startswith("progress:"):
                print(f"    | {line[len('progress:'):].strip()}", flush=True)

    threads = [threading.Thread(target=pump_stderr, daemon=True), threading.Thread(target=pump_stdout, daemon=True)]
    for t in threads:
        t.start()
    rc = proc.wait()
    wall = time.monotonic() - started
    for t in threads:
        t.join()
    sampler.stop()
    return Monitored(rc, wall, "".join(out_lines), tail, sampler)


# ------------------------------------------------------------------------------ skymoe
def skymoe_config(corpus: Corpus, root: Path, tokenizer: Path, args) -> dict:
    clean = {"inputs": [str(corpus.input_dir)], "executor": {"kind": args.executor, "workers": args.workers}}
    if not args.classifier:
        clean["classifier"] = {"enabled": False}
    return {"extends": "tiny", "storage": {"root": str(root)}, "clean": clean,
            "tokenize": {"tokenizer": {"path": str(tokenizer)}}}


def _done_end(output: Path, phase: str) -> float | None:
    """When a phase finished: the newest mtime of its done-records."""
    folder = output / "_done" / phase
    times = [p.stat().st_mtime for p in folder.glob("*")] if folder.is_dir() else []
    return max(times) if times else None


def stage_phases(output: Path, manifest: dict, docs: int, sampler: TreeSampler) -> list[dict]:
    """Each phase of a stage manifest's timings, in the order it ran, with docs/s and peak RSS."""
    rows = []
    for phase, seconds in manifest["timings"].items():
        if phase == "total":
            continue
        end = _done_end(output, phase)
        rows.append({"phase": phase, "seconds": seconds, "end": end})
    fallback = {name: k for k, name in enumerate(PHASE_ORDER)}
    rows.sort(key=lambda r: (r["end"] if r["end"] is not None else float("inf"), fallback.get(r["phase"], 99)))
    for row in rows:
        coord, worker = sampler.peak(row["end"] - row["seconds"] - POLL_S, row["end"] + POLL_S) \
            if row["end"] is not None else (0, 0)
        row.update(docs=docs, rate=docs / row["seconds"] if row["seconds"] else None, coord=coord, worker=worker)
    total = manifest["timings"]["total"]
    end = manifest.get("created_at")
    coord, worker = sampler.peak(end - total - POLL_S, end + POLL_S) if end else (0, 0)
    rows.append({"phase": "total (stage)", "seconds": total, "docs": docs, "rate": docs / total if total else None,
                 "coord": coord, "worker": worker, "end": end})
    return rows


def skymoe_drops(output: Path) -> tuple[set[str], list[tuple[str, str, str | None]], int]:
    """(ids dropped before dedup, dedup drops as (id, step, partner id or None), drops with no partner)."""
    import pyarrow.parquet as pq

    ids_of: dict[str, list[str]] = {}

    def resolve(key: str) -> str | None:
        if re.fullmatch(r"(en|zh)-\d{8}", key):
            return key
        match = re.fullmatch(r"([0-9a-f]+)/(\d+)", key)
        if not match:
            return None
        shard, row = match.group(1), int(match.group(2))
        if shard not in ids_of:
            path = output / "filtered" / f"{shard}.parquet"
            ids_of[shard] = pq.read_table(path, columns=["id"])["id"].to_pylist() if path.exists() else []
        return ids_of[shard][row] if row < len(ids_of[shard]) else None

    before, drops, unresolved = set(), [], 0
    for path in sorted((output / "rejects").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "step", "reason"])
        for doc_id, step, reason in zip(*(table[c].to_pylist() for c in ("id", "step", "reason"))):
            if "dedup" in step:
                match = re.search(r"duplicate_of:\s*(\S+)", reason or "")
                partner = resolve(match.group(1)) if match else None
                unresolved += partner is None
                drops.append((doc_id, step, partner))
            elif step != "recurring_text":
                before.add(doc_id)
    return before, drops, unresolved


def run_skymoe(corpus: Corpus, tokenizer: Path, args, tag: str) -> dict:
    """One ``skymoe run --until tokenize`` into a fresh root; phases, RSS and the dedup decisions."""
    import yaml

    runs = Path(args.workdir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    root = runs / tag
    shutil.rmtree(root, ignore_errors=True)
    config_path = runs / f"{tag}.yaml"
    config_path.write_text(yaml.safe_dump(skymoe_config(corpus, root, tokenizer, args), sort_keys=False))
    command = [str(Path(sys.executable).parent / "skymoe"), "run", "--config", str(config_path), "--until",
               "tokenize", "--json"]
    print(f"  skymoe run --config {config_path} --until tokenize --json  (log: {runs / tag}.log)", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = run_monitored(command, runs / f"{tag}.log", relay_stderr=True, ray=args.executor == "ray", env=env)
    if result.rc != 0:
        raise RuntimeError(f"skymoe run failed (exit {result.rc}); log {runs / tag}.log; last lines:\n"
                           + "\n".join(result.stderr_tail[-25:]))
    summary = json.loads(result.stdout)
    outputs = {r["stage"]: Path(r["uri"]) for r in summary["results"]}
    manifests = {stage: json.loads((outputs[stage] / "manifest.json").read_text()) for stage in ("clean", "tokenize")}
    clean_counts = manifests["clean"]["counts"]
    phases = {"clean": stage_phases(outputs["clean"], manifests["clean"], clean_counts["docs_in"], result.sampler),
              "tokenize": stage_phases(outputs["tokenize"], manifests["tokenize"], clean_counts["docs_out"],
                                       result.sampler)}
    before, drops, unresolved = skymoe_drops(outputs["clean"])
    coord, worker = result.sampler.peak()
    record = {
        "wall": result.wall, "phases": phases, "coord_peak": coord, "worker_peak": worker,
        "coord_hwm": result.sampler.hwm_kb * 1024, "helpers": dict(result.sampler.peak_by_kind),
        "workers_seen": len(result.sampler.workers_seen), "counts": clean_counts,
        "tokens": {k: v for k, v in manifests["tokenize"]["counts"].items() if k.endswith(("_tokens", "_sequences"))},
        "dropped_before_dedup": before, "drops": drops, "unresolved": unresolved,
        "docs_out_by_lang": clean_counts.get("docs_out_by_lang", {}),
    }
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------ datatrove
def xxhash64_str(text: str) -> int:
    """datatrove's default shingle hash (xxhash64) given the n-gram's UTF-8 bytes (xxhash >= 4 rejects str)."""
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def datatrove_child(input_dir: str, out: str, workers: int, shards: int) -> None:
    """Runs in a subprocess: datatrove's pipeline over the corpus; prints its stage times as JSON."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    config = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=MINHASH_SEED)
    signature = MinhashDedupSignature(f"{out}/signatures", config=config)
    signature._hash_func = xxhash64_str
    stages = [
        ("filters+signature", [JsonlReader(input_dir, compression="gzip", glob_pattern="*.jsonl.gz"),
                               GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(),
                               FineWebQualityFilter(), JsonlWriter(f"{out}/filtered"), signature], shards),
        ("buckets", [MinhashDedupBuckets(f"{out}/signatures", f"{out}/buckets", config=config)], BANDS),
        ("cluster", [MinhashDedupCluster(f"{out}/buckets", f"{out}/remove_ids", config=config,
                                         save_cluster_id=True)], 1),
        ("dedup filter+write", [JsonlReader(f"{out}/filtered", compression="gzip"),
                                MinhashDedupFilter(f"{out}/remove_ids", exclusion_writer=JsonlWriter(f"{out}/removed"),
                                                   load_cluster_ids=True),
                                ParquetWriter(f"{out}/output")], shards),
    ]
    timings = []
    for name, pipeline, tasks in stages:
        start, wall_start = time.monotonic(), time.time()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=f"{out}/logs/{name.replace(' ', '_')}").run()
        seconds = time.monotonic() - start
        timings.append({"phase": name, "seconds": seconds, "start": wall_start, "end": time.time()})
        print(f"progress: datatrove {name}: {tasks} tasks in {seconds:.1f}s", flush=True)
    print(json.dumps({"timings": timings}))


def _jsonl_records(folder: Path):
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def run_datatrove(corpus: Corpus, args, tag: str) -> dict:
    """datatrove's pipeline in a monitored subprocess; its timings, RSS and dedup decisions."""
    import pyarrow.parquet as pq

    runs = Path(args.workdir) / "runs"
    out = runs / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--datatrove-child", str(corpus.shard_dir),
               "--datatrove-out", str(out), "--workers", str(args.workers), "--shards", str(corpus.shards)]
    print(f"  datatrove pipeline, {corpus.shards} tasks, {args.workers} workers (log: {runs / tag}.log)", flush=True)
    result = run_monitored(command, runs / f"{tag}.log", relay_stderr=False)
    if result.rc != 0:
        raise RuntimeError(f"datatrove run failed (exit {result.rc}); log {runs / tag}.log; last lines:\n"
                           + "\n".join(result.stderr_tail[-25:]))
    timings = json.loads(result.stdout.strip().splitlines()[-1])["timings"]
    total = sum(t["seconds"] for t in timings)
    phases = []
    for t in timings:
        coord, worker = result.sampler.peak(t["start"] - POLL_S, t["end"] + POLL_S)
        phases.append({"phase": t["phase"], "seconds": t["seconds"], "docs": corpus.n,
                       "rate": corpus.n / t["seconds"], "coord": coord, "worker": worker})
    coord, worker = result.sampler.peak()
    phases.append({"phase": "total (4 executor runs)", "seconds": total, "docs": corpus.n, "rate": corpus.n / total,
                   "coord": coord, "worker": worker})
    reached = {r["id"] for r in _jsonl_records(out / "filtered")}
    filtered_files = len(list((out / "filtered").glob("*.jsonl.gz")))
    kept_cluster: dict[int, str] = {}
    kept_langs: Counter = Counter()
    for path in sorted((out / "output").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "metadata"])
        for doc_id, meta in zip(table["id"].to_pylist(), table["metadata"].to_pylist()):
            kept_langs[lang_of(doc_id)] += 1
            cluster = (meta or {}).get("minhash_cluster_id", -1)
            if cluster is not None and cluster >= 0:
                kept_cluster[cluster] = doc_id
    drops, unresolved = [], 0
    for record in _jsonl_records(out / "removed"):
        cluster = (record.get("metadata") or {}).get("minhash_cluster_id", -1)
        partner = kept_cluster.get(cluster)
        unresolved += partner is None
        drops.append((record["id"], "minhash", partner))
    record = {"wall": result.wall, "phases": phases, "coord_peak": coord, "worker_peak": worker,
              "coord_hwm": result.sampler.hwm_kb * 1024, "helpers": dict(result.sampler.peak_by_kind),
              "workers_seen": len(result.sampler.workers_seen), "reached": reached, "drops": drops,
              "unresolved": unresolved, "docs_out_by_lang": dict(kept_langs), "filtered_files": filtered_files,
              "reached_by_lang": dict(Counter(lang_of(i) for i in reached))}
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------ dedup scoring
def score_dedup(corpus: Corpus, pairs: list[Pair], reached: set[str], drops: list[tuple[str, str, str | None]],
                unresolved: int) -> dict:
    """Precision and recall of the dedup drops against the planted pairs (see the module docstring)."""
    partner_of = {}
    for p in pairs:
        partner_of[p.dup], partner_of[p.original] = p.original, p.dup
    dropped = {doc_id: partner for doc_id, _, partner in drops}

    def planted_right(doc_id: str, partner: str | None) -> bool:
        if partner is None:
            other = partner_of.get(doc_id)
            return other is not None and other in reached
        return partner_of.get(doc_id) == partner

    right = [planted_right(doc_id, partner) for doc_id, _, partner in drops]
    suspects = [(d, p) for (d, _, p), ok in zip(drops, right) if not ok and p is not None]
    texts = corpus_texts(corpus, {x for pair in suspects for x in pair})
    natural = sum(jaccard(shingles(texts[d], lang_of(d)), shingles(texts[p], lang_of(p))) >= VERIFY_JACCARD
                  for d, p in suspects if d in texts and p in texts)

    def recalled(p: Pair) -> bool:
        return (p.dup in dropped and planted_right(p.dup, dropped[p.dup])) or \
               (p.original in dropped and planted_right(p.original, dropped[p.original]))

    eligible = [p for p in pairs if p.dup in reached and p.original in reached]
    by_kind = {}
    for kind in ("exact", "near"):
        members = [p for p in eligible if p.kind == kind]
        by_kind[kind] = {"eligible": len(members), "recalled": sum(map(recalled, members))}
    bands = {}
    for low, high in JACCARD_BANDS:
        members = [p for p in eligible if p.kind == "near" and low <= p.jaccard < high]
        bands[f"{low:.2f}-{min(high, 1):.2f}"] = {"eligible": len(members), "recalled": sum(map(recalled, members))}
    lost = [p for p in pairs if p.dup not in reached or p.original not in reached]
    n_right, n_drops = sum(right), len(drops)
    n_eligible, n_recalled = len(eligible), sum(map(recalled, eligible))
    return {
        "drops": n_drops, "drops_by_step": dict(Counter(step for _, step, _ in drops)), "unresolved": unresolved,
        "planted_right": n_right, "natural_right": natural,
        "precision_planted": n_right / n_drops if n_drops else None,
        "precision_verified": (n_right + natural) / n_drops if n_drops else None,
        "eligible": n_eligible, "recalled": n_recalled, "recall": n_recalled / n_eligible if n_eligible else None,
        "by_kind": by_kind, "near_by_jaccard": bands,
        "reached": len(reached), "pairs": len(pairs), "pairs_lost_to_filters": len(lost),
        "planted_docs_filtered": sum((p.dup not in reached) + (p.original not in reached) for p in pairs),
    }


# ------------------------------------------------------------------------------ report
def mb(value: float | None) -> str:
    return f"{value / 2**20:,.0f}" if value else "-"


def table(rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i < right_from else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def median_phases(runs: list[dict], key: str = "phases") -> list[dict]:
    """Per phase, the median over repeats of seconds, docs/s and RSS (phases as the first run has them)."""
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    if isinstance(runs[0][key], dict):  # skymoe: {stage: rows}
        merged = {}
        for stage, rows in runs[0][key].items():
            merged[stage] = [{"phase": row["phase"], "docs": row["docs"],
                              **{f: med([next((r[f] for r in run[key][stage] if r["phase"] == row["phase"]), None)
                                         for run in runs]) for f in ("seconds", "rate", "coord", "worker")}}
                             for row in rows]
        return merged
    return [{"phase": row["phase"], "docs": row["docs"],
             **{f: med([next((r[f] for r in run[key] if r["phase"] == row["phase"]), None) for run in runs])
                for f in ("seconds", "rate", "coord", "worker")}} for row in runs[0][key]]


def phase_rows(stage: str, rows: list[dict]) -> list[list[str]]:
    return [[stage, row["phase"], f"{row['seconds']:.1f}", f"{row['docs']:,}",
             f"{row['rate']:,.0f}" if row["rate"] and row["seconds"] >= 0.05 else "-", mb(row["coord"]),
             mb(row["worker"])] for row in rows]


def print_size(n: int, corpus: Corpus, result: dict, args) -> None:
    meta = corpus_meta(corpus)
    sk = result["skymoe"]
    med = median_phases(sk)
    header = ["stage", "phase", "wall s", "docs", "docs/s", "RSS coord MB", "RSS worker MB"]
    rows = [header] + phase_rows("clean", med["clean"]) + phase_rows("tokenize", med["tokenize"])
    walls = [r["wall"] for r in sk]
    rows.append(["skymoe run", "command wall (incl. Prefect start)", f"{statistics.median(walls):.1f}", f"{n:,}",
                 f"{n / statistics.median(walls):,.0f}", mb(statistics.median(r["coord_peak"] for r in sk)),
                 mb(statistics.median(r["worker_peak"] for r in sk))])
    print(f"\n=== N = {n:,} documents: {corpus.shards} shards of {corpus.shard_docs:,}, "
          f"{meta['bytes'] / 2**20:,.0f} MiB gzip, langs {meta['langs']}, planted {meta['planted']} ===")
    runs_note = f"medians of {len(sk)} runs" if len(sk) > 1 else "1 run"
    print(f"skymoe ({args.executor} executor, {args.workers} workers; {runs_note}; "
          f"run walls {', '.join(f'{w:.0f}s' for w in walls)}):")
    print(table(rows, right_from=2))
    first = sk[0]
    print_processes(first)
    c = first["counts"]
    print(f"  clean: {c['docs_in']:,} in -> {c['docs_out']:,} out {c.get('docs_out_by_lang', {})}; tokens "
          f"{first['tokens']}")
    reasons = Counter({k: v for k, v in c.get("rejects_by_reason", {}).items()})
    print(f"  rejects by reason: {', '.join(f'{k} {v:,}' for k, v in reasons.most_common())}")
    if "datatrove" in result:
        dt = result["datatrove"]
        dmed = median_phases(dt)
        rows = [header] + phase_rows("datatrove", dmed)
        print(f"datatrove 0.10.1 (LocalPipelineExecutor, {args.workers} workers, {corpus.shards} tasks per "
              f"per-shard stage; {runs_note}):")
        print(table(rows, right_from=2))
        d0 = dt[0]
        print_processes(d0)
        print(f"  datatrove: {n:,} in -> {len(d0['reached']):,} after its filters {d0['reached_by_lang']} -> "
              f"{sum(d0['docs_out_by_lang'].values()):,} out {d0['docs_out_by_lang']}")
        if d0["filtered_files"] != corpus.shards:
            print(f"  WARNING: {d0['filtered_files']} filtered files for {corpus.shards} tasks: an empty task shifts "
                  f"the file-to-rank mapping of its MinHash filter stage")
    print_dedup(result)


def print_processes(run: dict) -> None:
    """The coordinator's high-water mark and the processes seen beside the workers, for one run."""
    helpers = ", ".join(f"{k} {mb(v)}" for k, v in sorted(run["helpers"].items()) if k != "worker")
    print(f"  coordinator VmHWM at exit {mb(run['coord_hwm'])} MB; {run['workers_seen']} worker processes seen; "
          f"not counted as workers (peak MB): {helpers or 'none'}")


def print_dedup(result: dict) -> None:
    rows = [["tool", "drops", "prec. planted", "prec. verified", "eligible pairs", "recall", "exact", "near",
             "near by Jaccard " + " / ".join(result["dedup"]["skymoe"]["near_by_jaccard"])]]
    for tool, s in result["dedup"].items():
        def frac(d):
            return f"{d['recalled'] / d['eligible']:.3f} ({d['eligible']:,})" if d["eligible"] else "-"
        rows.append([tool, f"{s['drops']:,}", f"{s['precision_planted']:.4f}" if s["precision_planted"] is not None
                     else "-", f"{s['precision_verified']:.4f}" if s["precision_verified"] is not None else "-",
                     f"{s['eligible']:,}", f"{s['recall']:.4f}" if s["recall"] is not None else "-",
                     frac(s["by_kind"]["exact"]), frac(s["by_kind"]["near"]),
                     " / ".join(frac(b) for b in s["near_by_jaccard"].values())])
    print("duplicates (planted pairs; eligible = both documents survived the per-document filters):")
    print(table(rows, right_from=1))
    for tool, s in result["dedup"].items():
        print(f"  {tool}: {s['reached']:,} documents passed its per-document filters and reached dedup; "
              f"drops by step {s['drops_by_step']}; {s['unresolved']} without a resolvable partner; "
              f"{s['natural_right']} non-planted drops verified (Jaccard >= {VERIFY_JACCARD}); "
              f"{s['pairs_lost_to_filters']:,} of {s['pairs']:,} pairs lost a member to the filters "
              f"({s['planted_docs_filtered']:,} planted-pair documents filtered)")


def growth_exponent(points: dict[int, float]) -> float | None:
    """Least-squares slope of log(time) against log(N)."""
    xs = [math.log(n) for n in points]
    ys = [math.log(t) for t in points.values()]
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" MET" if ok else " NOT MET")


def summary(results: dict[int, dict], args) -> dict:
    sizes = sorted(results)
    stage_total = {n: {stage: statistics.median(next(r["seconds"] for r in run["phases"][stage]
                                                     if r["phase"] == "total (stage)") for run in results[n]["skymoe"])
                       for stage in ("clean", "tokenize")} for n in sizes}
    out: dict = {"sizes": sizes}
    print(f"\n=== summary over N = {', '.join(f'{n:,}' for n in sizes)} ===")
    series = {"clean + tokenize": {n: t["clean"] + t["tokenize"] for n, t in stage_total.items()},
              "clean": {n: t["clean"] for n, t in stage_total.items()},
              "tokenize": {n: t["tokenize"] for n, t in stage_total.items()},
              "skymoe run (command wall)": {n: statistics.median(r["wall"] for r in results[n]["skymoe"])
                                            for n in sizes}}
    for phase in (row["phase"] for row in results[sizes[0]]["skymoe"][0]["phases"]["clean"]):
        if phase != "total (stage)":
            series[f"  clean/{phase}"] = {n: statistics.median(next((r["seconds"] for r in run["phases"]["clean"]
                                                                     if r["phase"] == phase), float("nan"))
                                                               for run in results[n]["skymoe"]) for n in sizes}
    out["growth_exponent"] = {}
    print("  time growth exponent (slope of log time vs log N; seconds per size in brackets):")
    for name, points in series.items():
        points = {n: t for n, t in points.items() if t and t > 0 and not math.isnan(t)}
        exponent = growth_exponent(points)
        out["growth_exponent"][name.strip()] = exponent
        shown = f"{exponent:.3f}" if exponent is not None else "n/a (one size)"
        if points and max(points.values()) < 1.0:
            shown = "- (under 1 s at every size: too short to fit)"
        if name == "clean + tokenize":
            shown += f" (target <= 1.05){verdict(exponent <= 1.05 if exponent is not None else None)}"
        print(f"    {name}: {shown}  [{', '.join(f'{t:.1f}' for t in points.values())}]")
    lo, hi = sizes[0], sizes[-1]
    coord = {n: statistics.median(r["coord_peak"] for r in results[n]["skymoe"]) for n in sizes}
    worker = {n: statistics.median(r["worker_peak"] for r in results[n]["skymoe"]) for n in sizes}
    coord_ratio = coord[hi] / coord[lo] if coord[lo] else None
    print(f"  coordinator peak RSS N={hi:,} / N={lo:,}: {mb(coord[hi])} / {mb(coord[lo])} MB = "
          f"{f'{coord_ratio:.2f}x' if coord_ratio else 'n/a'} (target <= 1.2x)"
          f"{verdict(coord_ratio <= 1.2 if coord_ratio and hi > lo else None)}   "
          f"[{', '.join(mb(coord[n]) for n in sizes)}]")
    with_workers = [n for n in sizes if worker[n]]  # a size whose phases all ran in the coordinator has none
    w_lo, w_hi = (with_workers[0], with_workers[-1]) if with_workers else (lo, hi)
    worker_ratio = worker[w_hi] / worker[w_lo] if len(with_workers) > 1 else None
    out.update(coord_rss_ratio=coord_ratio, worker_rss_ratio=worker_ratio)
    print(f"  largest worker peak RSS N={w_hi:,} / N={w_lo:,}: {mb(worker[w_hi])} / {mb(worker[w_lo])} MB = "
          f"{f'{worker_ratio:.2f}x' if worker_ratio else 'n/a (worker processes at fewer than 2 sizes)'} "
          f"(target flat, <= 1.2x){verdict(worker_ratio <= 1.2 if worker_ratio else None)}   "
          f"[{', '.join(mb(worker[n]) for n in sizes)}]")
    side = [n for n in sizes if "datatrove" in results[n]["dedup"]]
    for n in side:
        sk_rate = n / stage_total[n]["clean"]
        dt_total = statistics.median(run["phases"][-1]["seconds"] for run in results[n]["datatrove"])
        dt_rate = n / dt_total
        sk, dt = results[n]["dedup"]["skymoe"], results[n]["dedup"]["datatrove"]
        ratio = sk_rate / dt_rate
        out[f"side_by_side_{n}"] = {"skymoe_clean_docs_s": sk_rate, "datatrove_docs_s": dt_rate, "speedup": ratio,
                                    "skymoe_precision": sk["precision_planted"], "skymoe_recall": sk["recall"],
                                    "datatrove_precision": dt["precision_planted"], "datatrove_recall": dt["recall"]}
        print(f"  at N={n:,}, {args.workers} workers: skymoe clean stage {sk_rate:,.0f} docs/s vs datatrove "
              f"{dt_rate:,.0f} docs/s = {ratio:.2f}x (target >= 2x){verdict(ratio >= 2)}")
        prec = sk["precision_planted"]
        print(f"  at N={n:,}: skymoe duplicate precision {prec:.4f} vs planted, {sk['precision_verified']:.4f} "
              f"verified (target >= 0.99){verdict(prec >= 0.99 if prec is not None else None)}; datatrove "
              f"{dt['precision_planted'] if dt['precision_planted'] is None else round(dt['precision_planted'], 4)}")
        ok = sk["recall"] >= dt["recall"] if sk["recall"] is not None and dt["recall"] is not None else None
        print(f"  at N={n:,}: recall skymoe {sk['recall']:.4f} vs datatrove "
              f"{dt['recall'] if dt['recall'] is None else round(dt['recall'], 4)} (target: no lower){verdict(ok)}; "
              f"eligible pairs {sk['eligible']:,} vs {dt['eligible']:,} (after datatrove's filters: "
              f"{results[n]['datatrove'][0]['reached_by_lang']})")
    if not side:
        print("  datatrove side by side: not run (--skip-datatrove, or --datatrove-at not among the sizes)")
    return out


def jsonable(result: dict) -> dict:
    """Drop the id sets and drop lists (large) from a run record."""
    return {k: v for k, v in result.items() if k not in ("dropped_before_dedup", "drops", "reached")}


# ------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,100000,500000", help="corpus sizes N, comma-separated")
    ap.add_argument("--big", action="store_true", help="add N = 2,000,000 (bigger machines)")
    ap.add_argument("--workers", type=int, default=2, help="clean.executor.workers, and datatrove's workers")
    ap.add_argument("--executor", choices=("datatrove", "ray"), default="datatrove", help="skymoe's clean executor")
    ap.add_argument("--shard-docs", type=int, default=5000, help="documents per input shard (JSONL.gz file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zh-share", type=float, default=0.3, help="share of Chinese base documents")
    ap.add_argument("--workdir", default="/tmp/skymoe-bench-scale", help="corpus cache, tokenizer, run roots, logs")
    ap.add_argument("--repeats", type=int, default=1, help="runs per size; medians are quoted")
    ap.add_argument("--datatrove-at", type=int, default=100000, help="N of the datatrove side by side")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--classifier", action="store_true", help="keep the tiny preset's quality classifier on")
    ap.add_argument("--keep-runs", action="store_true", help="keep the stage outputs under <workdir>/runs")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--datatrove-child", help=argparse.SUPPRESS)
    ap.add_argument("--datatrove-out", help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.datatrove_child:
        datatrove_child(args.datatrove_child, args.datatrove_out, args.workers, args.shards)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import git_state  # benchmarks/provenance.py, beside this script

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | ({2_000_000} if args.big else set())
                   | (set() if args.skip_datatrove else {args.datatrove_at}))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"skymoe scale benchmark (python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}); {git_state(('pipelines', 'skymoe'))}")
    print(f"sizes {sizes}, {args.workers} workers, executor {args.executor}, shards of {args.shard_docs:,}, seed "
          f"{args.seed}, zh share {args.zh_share}, repeats {args.repeats}, datatrove at "
          f"{'-' if args.skip_datatrove else f'{args.datatrove_at:,}'}; workdir {workdir}")
    from skymoe.config import load_config

    tokenizer = ensure_tokenizer(workdir, args.seed, args.zh_share, load_config("tiny").tokenize.tokenizer.vocab_size)
    results: dict[int, dict] = {}
    for n in sizes:
        corpus = build_corpus(workdir, n, args.shard_docs, args.seed, args.zh_share)
        pairs = load_truth(corpus)
        result: dict = {"skymoe": [], "dedup": {}}
        with_datatrove = not args.skip_datatrove and n == args.datatrove_at
        if with_datatrove:
            result["datatrove"] = []
        for repeat in range(args.repeats):  # interleaved, so load from other users falls on both
            print(f"\nN = {n:,}, run {repeat + 1}/{args.repeats}: skymoe", flush=True)
            result["skymoe"].append(run_skymoe(corpus, tokenizer, args, f"skymoe-{n}-{repeat}"))
            if with_datatrove:
                print(f"N = {n:,}, run {repeat + 1}/{args.repeats}: datatrove", flush=True)
                result["datatrove"].append(run_datatrove(corpus, args, f"datatrove-{n}-{repeat}"))
        first = result["skymoe"][0]
        result["dedup"]["skymoe"] = score_dedup(corpus, pairs, all_ids(corpus) - first["dropped_before_dedup"],
                                                first["drops"], first["unresolved"])
        if with_datatrove:
            d0 = result["datatrove"][0]
            result["dedup"]["datatrove"] = score_dedup(corpus, pairs, d0["reached"], d0["drops"], d0["unresolved"])
        print_size(n, corpus, result, args)
        result["corpus"] = corpus_meta(corpus)
        results[n] = result
    totals = summary(results, args)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; total wall {time.monotonic() - started:.0f}s")
    if args.json:
        payload = {"args": vars(args), "git": git_state(("pipelines", "skymoe")), "summary": totals,
                   "sizes": {str(n): {"corpus": res["corpus"],
                                      "skymoe": [jsonable(r) for r in res["skymoe"]],
                                      "datatrove": [jsonable(r) for r in res.get("datatrove", [])],
                                      "dedup": res["dedup"]} for n, res in results.items()}}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        print(f"numbers written to {args.json}")
    return 0


def all_ids(corpus: Corpus) -> set[str]:
    """Every document id (``langs.txt`` holds each document's language initial, in order)."""
    initials = (corpus.folder / "langs.txt").read_text()
    return {f"{'zh' if c == 'z' else 'en'}-{i:08d}" for i, c in enumerate(initials)}


if __name__ == "__main__":
    raise SystemExit(main())
