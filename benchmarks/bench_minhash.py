"""MinHash near-duplicate detection: skymoe (pipelines/clean/dedup.py) vs. datatrove 0.10.1.

Both tools run at the same settings - word 5-grams (English) / character 5-grams (Chinese),
14 bands x 8 rows - on real English and Chinese documents with planted near-copies whose
source and edit level are known, so speed, precision and recall can be compared side by side.

The corpus:
- real documents of at least --min-chars characters: C4 and Dolma (English), zhwiki and
  cmrc2018 (Chinese) from examples/corpus/;
- to reach --base documents, further base documents are built by concatenating 3-4 random
  segments (runs of whole sentences) of real documents of one language, from different source
  documents, never reusing a pair of segments, so that two base documents share at most one
  segment (true 5-gram Jaccard well below the LSH threshold);
- --planted near-copies of random base documents, each placed somewhere after its source, with
  1/5/10/20/30% of tokens (words; Han characters for Chinese) replaced, deleted or inserted, or
  with its lines (or sentences) shuffled.

What is timed, per tool, is everything from the texts in memory to the duplicate decision:
- skymoe: MinHasher.signature for every document, then near_duplicate_clusters (all alive);
  a document is a duplicate when its root is not itself. "2 procs" computes the signatures in a
  2-process pool (as the clean stage's executor does per shard);
- datatrove: its four MinHash stages (Signature, Buckets, Cluster, Filter) under
  LocalPipelineExecutor in a temporary folder, documents fed from memory (no JSONL parsing),
  sharded contiguously so datatrove keeps the earliest copy like skymoe does. The duplicates
  are the documents its Filter stage drops. datatrove's language setting picks one word
  tokenizer per pipeline and its "zh" does not segment, so it is given a WordTokenizer (its
  documented extension point) that sends documents that are mostly Han characters to a Chinese
  tokenization - per character by default (--datatrove-zh char; the only way to get
  per-character CJK shingles there), or datatrove's own "cmn" (jieba) or "zh" - and all others
  to datatrove's own "en" tokenizer (spaCy). Its default xxhash64 shingle hash is kept, with the
  n-gram string encoded first (xxhash >= 4 rejects the str that datatrove 0.10.1 passes).

Precision: a flagged document is correct when it is a planted copy whose source is in its
cluster, or a source whose cluster kept its copy (P-planted); P-natural also counts flagged
documents whose true 5-gram Jaccard with another member of their cluster is >= 0.5 (natural
near-duplicates in the base data). Recall: planted copies that share a cluster with their
source (so exactly one of the two survives) / planted copies. datatrove's clusters are read from
its Cluster stage (save_cluster_id=True) after the clock stops.
Speeds are medians over --repeats on a shared 2-core machine.

    python benchmarks/bench_minhash.py --base 10000 --planted 2500 --repeats 3 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datatrove.data import Document  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.base import PipelineStep  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer  # noqa: E402

from skymoe.pipelines.clean.dedup import MinHasher, near_duplicate_clusters  # noqa: E402

CORPUS = ROOT / "examples" / "corpus"
NGRAM, BANDS, ROWS, SEED = 5, 14, 8, 1
KINDS = ["edit 1%", "edit 5%", "edit 10%", "edit 20%", "edit 30%", "line shuffle"]
EDIT_RATE = {"edit 1%": 0.01, "edit 5%": 0.05, "edit 10%": 0.10, "edit 20%": 0.20, "edit 30%": 0.30}
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
_EN_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
_ZH_SENT = re.compile(r"(?<=[。！？；])|\n+")
_WORD = re.compile(r"[^\W_]+")


# ------------------------------------------------------------------------------------ corpus
def load_real(min_chars: int) -> tuple[list[str], list[str]]:
    """Real English and Chinese documents with at least ``min_chars`` characters."""
    en, zh = [], []
    for path in (CORPUS / "c4" / "c4_demo.jsonl", CORPUS / "dolma" / "cc_en_head-0091.jsonl"):
        en += [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    zh += [line.rstrip("\n") for line in (CORPUS / "zhwiki" / "zhwiki_part1.txt").open(encoding="utf-8")]
    cmrc = CORPUS / "cmrc2018" / "cmrc2018_contexts.jsonl"
    zh += [json.loads(line)["text"] for line in cmrc.open(encoding="utf-8")]
    keep = lambda docs: [d.strip() for d in docs if len(d.strip()) >= min_chars]  # noqa: E731
    return keep(en), keep(zh)


def segments(text: str, lang: str, target: int) -> list[str]:
    """Cut a document into runs of whole sentences of about ``target`` characters."""
    sentences = [s.strip() for s in (_ZH_SENT if lang == "zh" else _EN_SENT).split(text) if s and s.strip()]
    glue = "" if lang == "zh" else " "
    out, current = [], []
    for sentence in sentences:
        current.append(sentence)
        if sum(map(len, current)) >= target:
            out.append(glue.join(current))
            current = []
    if current:
        tail = glue.join(current)
        if out and len(tail) < target // 3:
            out[-1] = out[-1] + glue + tail
        else:
            out.append(tail)
    return out


def synthetic_docs(rng: np.random.Generator, docs: list[str], lang: str, count: int, target: int) -> list[str]:
    """``count`` new documents of 3-4 segments from different real documents; no segment pair twice."""
    pool, owner = [], []
    for d, text in enumerate(docs):
        for seg in segments(text, lang, target):
            pool.append(seg)
            owner.append(d)
    used_pairs: set[tuple[int, int]] = set()
    out, attempts = [], 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise SystemExit(f"too few {lang} segments for {count} distinct concatenated documents")
        k = int(rng.integers(3, 5))
        pick = rng.choice(len(pool), size=k, replace=False)
        if len({owner[p] for p in pick}) < k:
            continue
        pairs = {(min(a, b), max(a, b)) for i, a in enumerate(pick) for b in pick[i + 1:]}
        if pairs & used_pairs:
            continue
        used_pairs |= pairs
        out.append("\n".join(pool[p] for p in pick))
    return out


def edit_tokens(rng: np.random.Generator, text: str, lang: str, rate: float, vocab: list[str]) -> str:
    """Replace (1/2), delete (1/4) or insert after (1/4) ``rate`` of the tokens (words / Han chars)."""
    pieces = list(text) if lang == "zh" else re.split(r"(\s+)", text)
    slots = [i for i, p in enumerate(pieces) if p and not p.isspace()]
    n_edits = max(1, round(rate * len(slots)))
    glue = "" if lang == "zh" else " "
    for i in rng.choice(slots, size=min(n_edits, len(slots)), replace=False):
        op = rng.random()
        word = vocab[int(rng.integers(len(vocab)))]
        if op < 0.5:
            pieces[i] = word
        elif op < 0.75:
            pieces[i] = ""
        else:
            pieces[i] = pieces[i] + glue + word
    return "".join(pieces)


def shuffle_lines(rng: np.random.Generator, text: str, lang: str) -> str:
    """Shuffle the lines; a document with fewer than 3 lines has its sentences shuffled."""
    units, glue = text.split("\n"), "\n"
    if len(units) < 3:
        units = [s for s in (_ZH_SENT if lang == "zh" else _EN_SENT).split(text) if s and s.strip()]
        glue = "" if lang == "zh" else " "
    if len(units) < 2:
        cut = len(text) // 2
        return text[cut:] + glue + text[:cut]
    order = list(range(len(units)))
    while order == sorted(order):
        order = [int(i) for i in rng.permutation(len(units))]
    return glue.join(units[i] for i in order)


def build_corpus(args) -> dict:
    rng = np.random.default_rng(args.seed)
    en_real, zh_real = load_real(args.min_chars)
    real = [(t, "en") for t in en_real] + [(t, "zh") for t in zh_real]
    if args.base <= len(real):
        base = [real[i] for i in sorted(rng.choice(len(real), args.base, replace=False))]
        n_syn_en = n_syn_zh = 0
    else:
        n_syn_en = min(max(0, args.base // 2 - len(en_real)), args.base - len(real))
        n_syn_zh = args.base - len(real) - n_syn_en
        base = (real + [(t, "en") for t in synthetic_docs(rng, en_real, "en", n_syn_en, 350)]
                + [(t, "zh") for t in synthetic_docs(rng, zh_real, "zh", n_syn_zh, 150)])
    n_real = len(base) - n_syn_en - n_syn_zh
    en_vocab = [w for t in en_real for w in t.split()][::7]
    zh_vocab = [c for t in zh_real for c in t if _HAN.match(c)][::7]

    sources = rng.choice(len(base), size=args.planted, replace=args.planted > len(base))
    copies = []
    for j, s in enumerate(sources):
        text, lang = base[s]
        kind = KINDS[j % len(KINDS)]
        if kind == "line shuffle":
            new = shuffle_lines(rng, text, lang)
        else:
            new = edit_tokens(rng, text, lang, EDIT_RATE[kind], zh_vocab if lang == "zh" else en_vocab)
        copies.append((new, lang, int(s), kind))

    # Input order: base documents shuffled, each copy somewhere after its source.
    key_base = rng.random(len(base))
    key_copy = np.array([key_base[s] + (1 - key_base[s]) * rng.random() for _, _, s, _ in copies])
    order = np.argsort(np.concatenate([key_base, key_copy]), kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    texts, langs = [None] * len(order), [None] * len(order)
    src = np.full(len(order), -1, dtype=np.int64)
    kind_of = np.full(len(order), "", dtype=object)
    for b, (text, lang) in enumerate(base):
        texts[position[b]], langs[position[b]] = text, lang
    for j, (text, lang, s, kind) in enumerate(copies):
        p = position[len(base) + j]
        texts[p], langs[p], src[p], kind_of[p] = text, lang, position[s], kind
    return {"texts": texts, "langs": langs, "src": src, "kind": kind_of, "n_real": n_real,
            "n_syn_en": n_syn_en, "n_syn_zh": n_syn_zh}


def true_shingles(text: str, lang: str) -> set:
    """Reference 5-gram set: lower-case words (English) or letters/digits (Chinese), punctuation dropped."""
    tokens = [c for c in text.lower() if c.isalnum()] if lang == "zh" else _WORD.findall(text.lower())
    if len(tokens) < NGRAM:
        return {tuple(tokens)}
    return {tuple(tokens[i:i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


# ------------------------------------------------------------------------------------ skymoe
_WORKER_HASHER = None


def _signatures(chunk: list[tuple[str, str]]) -> np.ndarray:
    return np.stack([_WORKER_HASHER.signature(t, lang) for t, lang in chunk])


def run_skymoe(texts: list[str], langs: list[str], procs: int) -> dict:
    """Texts -> signatures -> clusters; returns flagged mask, root, and seconds."""
    global _WORKER_HASHER
    start = time.perf_counter()
    _WORKER_HASHER = MinHasher(BANDS, ROWS, NGRAM, SEED)
    docs = list(zip(texts, langs))
    if procs == 1:
        signatures = _signatures(docs)
    else:
        import multiprocessing

        step = -(-len(docs) // (procs * 8))
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            signatures = np.concatenate(pool.map(_signatures, [docs[i:i + step] for i in range(0, len(docs), step)]))
    root = near_duplicate_clusters(signatures, BANDS, ROWS)
    seconds = time.perf_counter() - start
    return {"flagged": root != np.arange(len(texts)), "root": root, "seconds": seconds, "stages": {}}


# ------------------------------------------------------------------------------------ datatrove
class _Texts:
    """Holds the documents; its short str() keeps datatrove's executor.json from dumping them."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __str__(self):
        return f"<{len(self.texts)} in-memory documents>"


class MemoryReader(PipelineStep):
    """Feeds the documents from memory, split into contiguous blocks per rank (input order kept)."""

    name = "in-memory docs"
    type = "📖 - READER"

    def __init__(self, source: _Texts):
        super().__init__()
        self.source = source

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        texts = self.source.texts
        lo, hi = rank * len(texts) // world_size, (rank + 1) * len(texts) // world_size
        for i in range(lo, hi):
            self.stat_update("documents")
            yield Document(text=texts[i], id=str(i))


class KeptIds(PipelineStep):
    """Writes the ids of the documents that survive the filter (one file per rank)."""

    name = "kept ids"
    type = "💽 - WRITER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        ids = [doc.id for doc in data]
        Path(self.folder, f"kept_{rank:05d}.txt").write_text("\n".join(ids))
        yield from ()


class EnZhTokenizer(WordTokenizer):
    """Per document: datatrove's "en" tokenizer (spaCy) for English; for Chinese one token per
    character ("char"), or datatrove's own tokenizer for a language code ("cmn": spaCy-zh + jieba
    words; "zh": no segmentation)."""

    def __init__(self, zh_mode: str = "char"):
        super().__init__("en+zh")
        self.zh_mode = zh_mode
        self._en = self._zh = None

    def word_tokenize(self, text: str) -> list[str]:
        if 3 * len(_HAN.findall(text)) > len(text):
            if self.zh_mode == "char":
                return [c for c in text if not c.isspace()]
            if self._zh is None:
                self._zh = load_word_tokenizer(self.zh_mode)
            return self._zh.word_tokenize(text)
        if self._en is None:
            self._en = load_word_tokenizer("en")
        return self._en.word_tokenize(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def xxhash64_str(text: str) -> int:
    """datatrove's default shingle hash (xxhash64 of the n-gram string). datatrove 0.10.1 passes a
    str, which xxhash >= 4 rejects ("Strings must be encoded before hashing"); older xxhash hashed
    its UTF-8 bytes, which is what this does."""
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


@contextlib.contextmanager
def quiet_stderr():
    """datatrove logs every task to stderr (also from pool workers): send fd 2 to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_datatrove(texts: list[str], workers: int, zh_mode: str, hash_fc: str) -> dict:
    """The four MinHash stages, texts in memory -> ids that the Filter stage drops."""
    config = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=SEED,
                           hash_config=HashConfig(precision=64, hash_fc=hash_fc))
    language = EnZhTokenizer(zh_mode)
    source = _Texts(texts)
    stages = {}
    with tempfile.TemporaryDirectory(prefix="bench_minhash_") as tmp, quiet_stderr():
        start = time.perf_counter()
        signature = MinhashDedupSignature(f"{tmp}/sigs", config=config, language=language)
        if hash_fc == "xxhash":
            signature._hash_func = xxhash64_str
        runs = [
            ("signature", [MemoryReader(source), signature], workers),
            ("buckets", [MinhashDedupBuckets(f"{tmp}/sigs", f"{tmp}/buckets", config=config)], BANDS),
            ("cluster", [MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/remove", config=config,
                                             save_cluster_id=True)], 1),
            ("filter", [MemoryReader(source), MinhashDedupFilter(f"{tmp}/remove"), KeptIds(tmp)], workers),
        ]
        for name, pipeline, tasks in runs:
            t0 = time.perf_counter()
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                                  logging_dir=f"{tmp}/logs_{name}").run()
            stages[name] = time.perf_counter() - t0
        seconds = time.perf_counter() - start
        kept = np.zeros(len(texts), dtype=bool)
        for path in Path(tmp).glob("kept_*.txt"):
            ids = path.read_text().split()
            kept[np.array(ids, dtype=np.int64)] = True
        # Cluster membership (for the natural-duplicate check), read after the clock stopped.
        root = np.arange(len(texts))
        cluster_of: dict[int, list[int]] = {}
        for rank in range(workers):
            path = Path(tmp, "remove", f"{rank:06d}.clusters")
            if path.exists():
                offset = rank * len(texts) // workers
                for doc, cluster in struct.iter_unpack("<2I", path.read_bytes()):
                    cluster_of.setdefault(cluster, []).append(offset + doc)
        for members in cluster_of.values():
            root[members] = min(members)
    return {"flagged": ~kept, "root": root, "seconds": seconds, "stages": stages}


# ------------------------------------------------------------------------------------ scoring
def score(result: dict, corpus: dict, shingles: list) -> dict:
    """Precision/recall of one run. ``root`` labels clusters (its smallest member for both tools).

    A flagged copy is right when its source is in its cluster; a flagged base document is right
    (planted) when its cluster kept one of its copies instead. Other flagged documents are natural
    near-duplicates when their true 5-gram Jaccard with another member of their cluster is >= 0.5.
    A copy is recalled when it and its source share a cluster (so exactly one of them survives).
    """
    flagged, label, src, kind = result["flagged"], result["root"], corpus["src"], corpus["kind"]
    n = len(flagged)
    is_copy = src >= 0
    members: dict[int, list[int]] = {}
    for i, r in enumerate(label):
        members.setdefault(int(r), []).append(i)
    kept_of = {r: next((m for m in ms if not flagged[m]), r) for r, ms in members.items() if len(ms) > 1}
    recalled = is_copy & (label == label[np.where(is_copy, src, np.arange(n))])
    right = flagged & recalled
    for i in np.flatnonzero(flagged & ~is_copy):
        kept = kept_of.get(int(label[i]), i)
        right[i] = src[kept] == i
    natural, false_j = 0, []
    for i in np.flatnonzero(flagged & ~right):
        others = [j for j in members[int(label[i])] if j != i][:200]
        best = max((jaccard(shingles[i], shingles[j]) for j in others), default=0.0)
        if best >= 0.5:
            natural += 1
        else:
            false_j.append(round(best, 3))
    n_flagged, n_right = int(flagged.sum()), int(right.sum())
    by_kind = {k: float(recalled[kind == k].sum() / max(1, (kind == k).sum())) for k in KINDS}
    langs = np.array(corpus["langs"])
    for lang in ("en", "zh"):
        in_lang = is_copy & (langs == lang)
        by_kind[lang] = float(recalled[in_lang].sum() / max(1, in_lang.sum()))
    return {"flagged": n_flagged, "planted_hits": n_right, "natural": natural, "false_jaccard": sorted(false_j),
            "false": n_flagged - n_right - natural, "p_planted": n_right / max(1, n_flagged),
            "p_natural": (n_right + natural) / max(1, n_flagged),
            "recall": recalled.sum() / max(1, is_copy.sum()), "by_kind": by_kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=10_000, help="base documents (real + concatenated)")
    parser.add_argument("--planted", type=int, default=2_500, help="planted near-copies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (the MinHash seed is 1 for both)")
    parser.add_argument("--min-chars", type=int, default=200)
    parser.add_argument("--workers", default="1,2", help="datatrove worker counts to run, e.g. 1,2")
    parser.add_argument("--datatrove-zh", default="char", choices=["char", "cmn", "zh"],
                        help="datatrove's tokens for Chinese documents: per character, or its own "
                             "tokenizer for 'cmn' (jieba words) or 'zh' (no segmentation); English "
                             "documents always get its 'en' tokenizer")
    parser.add_argument("--datatrove-hash", default="xxhash", choices=["xxhash", "sha1"],
                        help="datatrove shingle hash (64-bit); xxhash is its default")
    args = parser.parse_args()

    t0 = time.perf_counter()
    corpus = build_corpus(args)
    texts, langs, src, kind = corpus["texts"], corpus["langs"], corpus["src"], corpus["kind"]
    shingles = [true_shingles(t, lang) for t, lang in zip(texts, langs)]
    n = len(texts)
    n_zh = sum(lang == "zh" for lang in langs)
    chars = sum(map(len, texts))
    print(f"corpus: {n} docs ({n - n_zh} en, {n_zh} zh; {chars / 1e6:.1f}M chars), built in "
          f"{time.perf_counter() - t0:.1f}s")
    print(f"  base {n - int((src >= 0).sum())}: {corpus['n_real']} real documents (>= {args.min_chars} chars) + "
          f"{corpus['n_syn_en']} en / {corpus['n_syn_zh']} zh made by concatenating 3-4 random segments of real "
          f"documents (no segment pair reused)")
    jac = np.array([jaccard(shingles[i], shingles[src[i]]) if src[i] >= 0 else np.nan for i in range(n)])
    print(f"  planted {int((src >= 0).sum())} near-copies, each after its source; true 5-gram Jaccard to source "
          "(median): " + ", ".join(f"{k} {np.nanmedian(jac[kind == k]):.2f}" for k in KINDS))
    zh_tokens = {"char": "per character", "cmn": "its 'cmn' (jieba words)", "zh": "its 'zh' (unsegmented)"}
    print(f"settings: {NGRAM}-grams, {BANDS} bands x {ROWS} rows, seed {SEED}; datatrove tokens: en its 'en' (spaCy), "
          f"zh {zh_tokens[args.datatrove_zh]}; datatrove shingle hash {args.datatrove_hash}64"
          + (" (str encoded to UTF-8 for xxhash>=4)" if args.datatrove_hash == "xxhash" else "")
          + f"; {os.cpu_count()} cores; repeats {args.repeats}")

    tools = [("skymoe", lambda: run_skymoe(texts, langs, 1)), ("skymoe 2 procs", lambda: run_skymoe(texts, langs, 2))]
    for w in [int(x) for x in args.workers.split(",") if x]:
        tools.append((f"datatrove w={w}", lambda w=w: run_datatrove(texts, w, args.datatrove_zh, args.datatrove_hash)))

    # Warm-up (imports, spaCy/jieba load, numpy) on a slice, untimed.
    run_skymoe(texts[:300], langs[:300], 1)
    run_datatrove(texts[:300], 1, args.datatrove_zh, args.datatrove_hash)

    runs: dict[str, list[dict]] = {name: [] for name, _ in tools}
    for _ in range(args.repeats):
        for name, fn in tools:
            runs[name].append(fn())

    rows = []
    for name, _ in tools:
        results = runs[name]
        same = all(np.array_equal(r["flagged"], results[0]["flagged"]) for r in results)
        secs = [r["seconds"] for r in results]
        rows.append((name, statistics.median(secs), min(secs), max(secs), same, score(results[-1], corpus, shingles),
                     {k: statistics.median(r["stages"][k] for r in results) for k in results[0]["stages"]}))
    dt_best = min(r[1] for r in rows if r[0].startswith("datatrove"))
    sky_1 = next(r for r in rows if r[0] == "skymoe")
    same_sky = np.array_equal(runs["skymoe"][-1]["flagged"], runs["skymoe 2 procs"][-1]["flagged"])

    print()
    print(f"{'tool':<16} {'docs/s (median)':>16} {'s min..max':>13} {'x best dt':>9} {'flagged':>8} {'planted':>8} "
          f"{'natural':>8} {'false':>6} {'P-planted':>9} {'P-natural':>9} {'recall':>7}  same-every-repeat")
    for name, med, lo, hi, same, s, _ in rows:
        print(f"{name:<16} {n / med:>16,.0f} {lo:>6.2f}..{hi:<6.2f} {dt_best / med:>9.2f} {s['flagged']:>8} "
              f"{s['planted_hits']:>8} {s['natural']:>8} {s['false']:>6} {s['p_planted']:>9.4f} "
              f"{s['p_natural']:>9.4f} {s['recall']:>7.4f}  {same}")
    print()
    columns = KINDS + ["en", "zh"]
    print("recall by edit level   " + "".join(f"{k:>13}" for k in columns))
    for name, *_, s, _ in rows:
        print(f"{name:<23}" + "".join(f"{s['by_kind'][k]:>13.3f}" for k in columns))
    langs_arr = np.array(langs)
    print(f"{'median true Jaccard':<23}" + "".join(f"{np.nanmedian(jac[kind == k]):>13.2f}" for k in KINDS)
          + "".join(f"{np.nanmedian(jac[langs_arr == k]):>13.2f}" for k in ("en", "zh")))
    print(f"{'planted copies':<23}" + "".join(f"{int((kind == k).sum()):>13}" for k in KINDS)
          + "".join(f"{int(((src >= 0) & (langs_arr == k)).sum()):>13}" for k in ("en", "zh")))
    print()
    for name, *_, s, _ in rows:
        print(f"{name}: false positives, best true 5-gram Jaccard to another cluster member: {s['false_jaccard']}")
    print()
    for name, med, *_, stages in rows:
        if stages:
            print(f"{name} stage medians (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print(f"skymoe 1 proc vs 2 procs identical decisions: {same_sky}")
    print(f"speed ratio skymoe (1 proc) / datatrove w=1: "
          f"{next(r[1] for r in rows if r[0] == 'datatrove w=1') / sky_1[1]:.2f}x" if "datatrove w=1" in runs else "")
    print(f"speed ratio skymoe (1 proc) / best datatrove: {dt_best / sky_1[1]:.2f}x; "
          f"skymoe 2 procs / best datatrove: {dt_best / next(r[1] for r in rows if r[0] == 'skymoe 2 procs'):.2f}x")
    print(f"total benchmark time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
