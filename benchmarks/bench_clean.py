"""Benchmark skymoe's English heuristic filters against datatrove's, on real documents.

What is timed, single process, on the same documents (fresh ``Document`` objects every run,
because the C4 rules rewrite ``doc.text``):

(a) skymoe: the chain from ``heuristic_steps(HeuristicsConfig())``, all of it: the spam-term
    blocklist (no datatrove counterpart), the four English rules, and the zh/code steps, which pass
    English documents through untouched; documents tagged ``lang=en``;
(b) datatrove 0.10.1: ``GopherRepetitionFilter() -> GopherQualityFilter() -> C4QualityFilter()
    -> FineWebQualityFilter()``, default arguments, chained with ``run`` as a pipeline would;
(c) skymoe's per-document filter phase: ``LanguageId(LanguageConfig())`` then (a), documents
    untagged (language id decides); reported separately, datatrove has no offline equivalent;
plus a Chinese line: skymoe's chain on zhwiki articles (``lang=zh``; no datatrove equivalent).

Input: the 300 C4 documents and 10 Dolma CC documents in ``examples/corpus`` cycled to ``--docs``.
Models are loaded and warmed up before the clock starts (spaCy blank English, lingua).

Agreement: keep/drop of the two chains per document (skymoe's whole chain, then its four
counterpart rules alone, the blocklist left out), and per rule, each rule applied on its own
to identical input (the original text; FineWeb gets the text as datatrove's C4 filter leaves it,
as it would in the chain). Reasons are compared as ``rule:reason`` (the reason strings are the
same in both implementations).

Run: ``python benchmarks/bench_clean.py [--docs 1860] [--repeats 3] [--no-zh] [--no-langid]``
(about 3 minutes with the defaults on 2 shared cores; datatrove's ~20 ms/doc dominates).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from provenance import files_digest, git_state  # noqa: E402  (benchmarks/provenance.py, beside this script)

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.filters import (  # noqa: E402
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from skymoe.pipelines.clean.heuristics import (  # noqa: E402
    C4Lines,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    heuristic_steps,
)
from skymoe.pipelines.clean.steps import REJECT  # noqa: E402
from skymoe.config import HeuristicsConfig, LanguageConfig  # noqa: E402

CORPUS = ROOT / "examples" / "corpus"
EN_FILES = (CORPUS / "c4" / "c4_demo.jsonl", CORPUS / "dolma" / "cc_en_head-0091.jsonl")
ZH_FILE = CORPUS / "zhwiki" / "zhwiki_part1.txt"
RULES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")  # chain order, skymoe step names
SOURCES = ("pipelines/clean/text.py", "pipelines/clean/heuristics.py", "pipelines/clean/steps.py")


def code_version() -> str:
    """git HEAD, uncommitted changes to the filter sources, and a digest of those sources as read."""
    return f"{git_state(SOURCES)}; filter sources sha256 {files_digest(SOURCES)}"


# ------------------------------------------------------------------------------ input
def load_english() -> list[tuple[str, str]]:
    """(label, text) of every English document, in file order."""
    docs = []
    for path in EN_FILES:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    docs.append((f"{path.parent.name}/{path.name}:{line_no}", json.loads(line)["text"]))
    return docs


def load_chinese() -> list[tuple[str, str]]:
    with ZH_FILE.open(encoding="utf-8") as f:
        return [(f"zhwiki/{ZH_FILE.name}:{i}", line.rstrip("\n")) for i, line in enumerate(f, 1) if line.strip()]


def cycle_to(items: list, n: int) -> list[int]:
    """Indices into ``items`` repeated in order until there are ``n``."""
    return list(itertools.islice(itertools.cycle(range(len(items))), n))


def fresh_docs(texts: list[str], order: list[int], lang: str | None) -> list[Document]:
    return [Document(text=texts[u], id=f"{k}", metadata={"lang": lang} if lang else {})
            for k, u in enumerate(order)]


# ------------------------------------------------------------------------------ the chains
def datatrove_filters() -> list:
    return [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]


def run_datatrove(docs: list[Document]) -> set[str]:
    """The plain datatrove pipeline; returns the ids it kept (it drops the rest)."""
    data = iter(docs)
    for step in datatrove_filters():
        data = step.run(data)
    return {doc.id for doc in data}


def run_skymoe(docs: list[Document], langid: bool = False) -> dict[str, dict | None]:
    """skymoe's chain (optionally behind language id); returns id -> reject mark or None."""
    steps = heuristic_steps(HeuristicsConfig())
    if langid:
        steps = [_LANGID, *steps]
    data = iter(docs)
    for step in steps:
        data = step.run(data)
    return {doc.id: doc.metadata.get(REJECT) for doc in data}


_LANGID = None  # one LanguageId for all runs: its lingua detector is built once, before timing


def timed(fn, docs: list[Document]):
    start = time.perf_counter()
    out = fn(docs)
    return time.perf_counter() - start, out


# ------------------------------------------------------------------------------ decisions
def _dt_result(flt, doc: Document) -> str | None:
    res = flt.filter(doc)
    if isinstance(res, tuple):
        return res[1] if not res[0] else None
    return None if res else "dropped"


def per_rule_decisions(text: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """Each rule alone, both implementations, on identical input. Returns (datatrove, skymoe)
    maps rule -> reason (None = keep)."""
    cfg = HeuristicsConfig()
    dt_rules = dict(zip(RULES, datatrove_filters()))
    sk_rules = {
        "gopher_repetition": GopherRepetition(cfg.gopher_repetition, "en", cfg.gopher_repetition.top_n_grams,
                                              cfg.gopher_repetition.dup_n_grams),
        "gopher_quality": GopherQuality(cfg.gopher_quality),
        "c4": C4Lines(cfg.c4, "en"),
        "fineweb": FineWebQuality(cfg.fineweb),
    }
    dt, sk = {}, {}
    fineweb_input = text
    for rule in RULES:
        dt_doc = Document(text=fineweb_input if rule == "fineweb" else text, id="x")
        sk_doc = Document(text=dt_doc.text, id="x", metadata={"lang": "en"})
        dt[rule] = _dt_result(dt_rules[rule], dt_doc)
        sk[rule] = sk_rules[rule].check(sk_doc)
        if rule == "c4" and dt[rule] is None:
            fineweb_input = dt_doc.text  # what datatrove's C4 filter leaves for FineWeb
    return dt, sk


def first_reject(rules: dict[str, str | None]) -> str | None:
    for rule in RULES:
        if rules[rule] is not None:
            return f"{rule}:{rules[rule]}"
    return None


def diagnose(text: str) -> str:
    """A short numeric hint at why the implementations differ (word-level counts)."""
    from datatrove.utils.text import split_into_words

    from skymoe.pipelines.clean.text import latin_words

    def alpha(words):
        return sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1)

    a, b = split_into_words(text), latin_words(text)
    return (f"{len(text)} chars; words spaCy {len(a)} / skymoe {len(b)}; "
            f"alpha-word ratio spaCy {alpha(a):.4f} / skymoe {alpha(b):.4f} (min 0.8)")


def top_ngrams(text: str) -> str:
    """Gopher repetition measures under each tokenization: the top 2-gram and the duplicated 5-grams."""
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate
    from datatrove.utils.text import split_into_words

    from skymoe.pipelines.clean.heuristics import WordGrams
    from skymoe.pipelines.clean.text import latin_words

    def top(words, n=2):
        grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        if not grams:
            return "-"
        gram, count = grams.most_common(1)[0]
        return f"{gram!r} x{count} = {len(gram) * count / len(text):.3f}"

    a, b = split_into_words(text), latin_words(text)
    return (f"top 2-gram spaCy {top(a)} / skymoe {top(b)} (max 0.20); duplicated 5-gram chars spaCy "
            f"{find_all_duplicate(a, 5) / len(text):.4f} / skymoe {WordGrams(b).repeated_chars(5) / len(text):.4f} "
            f"(max 0.15)")


def c4_sentences(text: str) -> str:
    """Sentences counted on C4-kept lines by each implementation (threshold 5)."""
    from datatrove.utils.text import split_into_sentences

    from skymoe.pipelines.clean.text import count_sentences

    dt = sk = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith((".", "?", "!", '"', "'")) and not line.endswith("...") and len(line.split()) >= 3:
            dt += len(split_into_sentences(line))
            sk += count_sentences(line, "en")
    return f"sentences on C4's candidate lines spaCy {dt} / skymoe {sk} (min 5)"


# ------------------------------------------------------------------------------ report helpers
def rate(n: int, seconds: list[float]) -> str:
    rates = [n / s for s in seconds]
    return f"{statistics.median(rates):8.1f} docs/s  (min {min(rates):.1f}, max {max(rates):.1f}; " \
           f"{1000 * statistics.median(seconds) / n:.2f} ms/doc)"


def pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.1f}%)" if b else f"{a}/0"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def report_chain(title: str, dt_chain: list, sk_chain: list, n: int) -> None:
    print(f"  {title}:")
    cm = Counter((d is None, s is None) for d, s in zip(dt_chain, sk_chain))
    print(f"    agreement (both keep or both drop): {pct(cm[(True, True)] + cm[(False, False)], n)}")
    print("    confusion             skymoe keep  skymoe drop")
    print(f"      datatrove keep     {cm[(True, True)]:11d}  {cm[(True, False)]:11d}")
    print(f"      datatrove drop     {cm[(False, True)]:11d}  {cm[(False, False)]:11d}")
    both_drop = [(d, s) for d, s in zip(dt_chain, sk_chain) if d and s]
    print(f"    both drop with the same rule:reason: {pct(sum(d == s for d, s in both_drop), len(both_drop))}; "
          f"keep rate datatrove {100 * (cm[(True, True)] + cm[(True, False)]) / n:.1f}%, "
          f"skymoe {100 * (cm[(True, True)] + cm[(False, True)]) / n:.1f}%")
    crosstab = Counter((d or "keep", s or "keep") for d, s in zip(dt_chain, sk_chain) if d != s)
    if crosstab:
        print("    differing decisions (datatrove -> skymoe: docs):")
        for (d, s), c in crosstab.most_common(8):
            print(f"      {d} -> {s}: {c}")


def main() -> int:
    global _LANGID
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1860,
                    help="documents per run: the 310 real ones cycled (1860 = each exactly 6 times; datatrove at "
                         "~50 docs/s makes 3000 x 3 repeats take 4-6 minutes on 2 shared cores)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported")
    ap.add_argument("--no-zh", action="store_true", help="skip the Chinese throughput line")
    ap.add_argument("--no-langid", action="store_true", help="skip (c), language id + heuristics")
    ap.add_argument("--examples", type=int, default=8, help="disagreement examples to print")
    args = ap.parse_args()
    wall = time.perf_counter()

    version = code_version()
    english = load_english()
    en_texts = [t for _, t in english]
    order = cycle_to(english, args.docs)
    n = len(order)
    n_c4 = sum(1 for label, _ in english if label.startswith("c4/"))
    print(f"skymoe clean-heuristics benchmark  (python {platform.python_version()}, {platform.machine()}, "
          f"single process, {args.repeats} repeats, medians)")
    print(f"skymoe code: {version}; datatrove {_version('datatrove')}, spaCy {_version('spacy')}")
    sample = (f"the {len(english)} real documents" if n >= len(english)
              else f"the first {n} of the {len(english)} real documents")
    print(f"English input: {n} docs = {sample} ({n_c4} C4 c4_demo.jsonl + {len(english) - n_c4} Dolma "
          f"cc_en_head-0091.jsonl, {sum(map(len, en_texts)) / len(en_texts):.0f} chars mean)"
          f"{f' cycled in order to {n} ({n / len(english):.1f} copies each)' if n > len(english) else ''}; "
          f"fresh Document objects for every run")

    zh = zh_order = None
    if not args.no_zh:
        zh = load_chinese()
        zh_order = list(range(min(n, len(zh))))  # the real articles, no cycling needed
    zh_texts = [t for _, t in zh] if zh else []

    # Warm-up outside the clock: spaCy blank English for datatrove; lingua, which loads its
    # language models lazily on first use, over every distinct text once.
    warm = list(range(min(20, len(en_texts))))
    run_datatrove(fresh_docs(en_texts, warm, None))
    run_skymoe(fresh_docs(en_texts, warm, "en"))
    if not args.no_langid:
        from skymoe.pipelines.clean.langid import LanguageId

        _LANGID = LanguageId(LanguageConfig())
        run_skymoe(fresh_docs(en_texts, list(range(len(en_texts))), None), langid=True)
        if zh:
            run_skymoe(fresh_docs(zh_texts, zh_order, None), langid=True)

    times: dict[str, list[float]] = {}
    sk_out = dt_kept = lid_out = zh_out = zh_lid_out = None
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        t, sk_out = timed(run_skymoe, fresh_docs(en_texts, order, "en"))
        times.setdefault("sk", []).append(t)
        t, dt_kept = timed(run_datatrove, fresh_docs(en_texts, order, None))
        times.setdefault("dt", []).append(t)
        if not args.no_langid:
            t, lid_out = timed(lambda d: run_skymoe(d, langid=True), fresh_docs(en_texts, order, None))
            times.setdefault("lid", []).append(t)
        if zh:
            t, zh_out = timed(run_skymoe, fresh_docs(zh_texts, zh_order, "zh"))
            times.setdefault("zh", []).append(t)
            if not args.no_langid:
                t, zh_lid_out = timed(lambda d: run_skymoe(d, langid=True), fresh_docs(zh_texts, zh_order, None))
                times.setdefault("zh_lid", []).append(t)

    print()
    print("Throughput (single process)")
    print(f"  (a) skymoe heuristic_steps, en         {rate(n, times['sk'])}")
    print(f"  (b) datatrove GopherRep->GopherQual->C4->FineWeb {rate(n, times['dt'])}")
    ratios = [d / s for s, d in zip(times["sk"], times["dt"])]
    med_ratio = statistics.median(n / s for s in times["sk"]) / statistics.median(n / s for s in times["dt"])
    print(f"  skymoe/datatrove speed-up: {med_ratio:.1f}x (ratio of medians; per repeat "
          f"{', '.join(f'{r:.1f}x' for r in ratios)}); target >= 3x: {'MET' if med_ratio >= 3 else 'NOT MET'}")
    if "lid" in times:
        lid_ratio = statistics.median(n / s for s in times["lid"]) / statistics.median(n / s for s in times["dt"])
        lid_langs = Counter((r or {}).get("reason") for r in lid_out.values() if (r or {}).get("step") == "language")
        print(f"  (c) skymoe LanguageId + heuristics, en {rate(n, times['lid'])}  "
              f"[{lid_ratio:.1f}x datatrove's heuristics alone; language id rejected "
              f"{sum(lid_langs.values())}/{n}: {dict(lid_langs) or '-'}]")
    if zh:
        zh_drop = Counter(f"{r['step']}:{r['reason']}" for r in zh_out.values() if r)
        print(f"  zh: skymoe heuristic_steps on {len(zh_order)} real zhwiki_part1.txt articles (lang=zh) "
              f"{rate(len(zh_order), times['zh'])}")
        print(f"      kept {len(zh_order) - sum(zh_drop.values())}/{len(zh_order)}; top rejects "
              f"{dict(zh_drop.most_common(4))}")
        if "zh_lid" in times:
            print(f"  zh: skymoe LanguageId + heuristics      {rate(len(zh_order), times['zh_lid'])}")
        print("      (no datatrove counterpart: its filters have no Chinese character-based rules)")

    # ------------------------------------------------------------------ decisions
    per_unique = [per_rule_decisions(t) for t in en_texts]
    dt_chain_u = [first_reject(dt) for dt, _ in per_unique]
    sk4_chain_u = [first_reject(sk) for _, sk in per_unique]
    dt_chain = [dt_chain_u[u] for u in order]
    sk4_chain = [sk4_chain_u[u] for u in order]  # skymoe's four counterpart rules, nothing else
    sk_chain = []  # skymoe's whole default chain, as the timed run decided
    for k in range(n):
        mark = sk_out[str(k)]
        sk_chain.append(f"{mark['step']}:{mark['reason']}" if mark else None)
    dt_check = sum((dt_chain[k] is None) == (str(k) in dt_kept) for k in range(n))
    own = [k for k in range(n) if sk_chain[k] and sk_chain[k].split(":", 1)[0] not in RULES]
    own_set = set(own)
    sk_check = sum(sk_chain[k] == sk4_chain[k] for k in range(n) if k not in own_set)

    print()
    print(f"Keep/drop agreement over the {n} docs ({len(set(order))} distinct texts)")
    report_chain("skymoe's whole default chain vs datatrove's four filters", dt_chain, sk_chain, n)
    if own:
        own_reasons = Counter(sk_chain[k] for k in own)
        print(f"  skymoe-only steps (no datatrove counterpart) rejected {len(own)} docs, "
              f"{sum(dt_chain[k] is None for k in own)} of them kept by datatrove: "
              f"{dict(own_reasons.most_common(3))}")
    report_chain("the four counterpart rules only (GopherRep, GopherQual, C4, FineWeb)", dt_chain, sk4_chain, n)
    print(f"  (consistency: datatrove per-rule pass vs the timed pipeline's kept set {dt_check}/{n}; skymoe "
          f"per-rule pass vs the timed chain {sk_check}/{n - len(own)} docs not rejected by skymoe-only steps)")

    print()
    print("Per-rule agreement (each rule alone on identical input, over the same docs)")
    print(f"  {'rule':18s} {'agree':>17s} {'both keep':>9s} {'both drop':>9s} {'same reason':>11s} "
          f"{'dt-only drop':>12s} {'sky-only drop':>13s}")
    for rule in RULES:
        pairs = [(per_unique[u][0][rule], per_unique[u][1][rule]) for u in order]
        c = Counter((d is None, s is None) for d, s in pairs)
        same = sum(1 for d, s in pairs if d and s and d == s)
        print(f"  {rule:18s} {pct(c[(True, True)] + c[(False, False)], n):>17s} {c[(True, True)]:9d} "
              f"{c[(False, False)]:9d} {same:11d} {c[(False, True)]:12d} {c[(True, False)]:13d}")
        diff = Counter((d or "keep", s or "keep") for d, s in pairs if d != s)
        if diff:
            print("      " + "; ".join(f"{d} -> {s}: {k}" for (d, s), k in diff.most_common(4)))

    print()
    print("Disagreement examples (distinct texts; four counterpart rules, chain decision datatrove -> skymoe)")
    differing = [u for u in sorted(set(order)) if dt_chain_u[u] != sk4_chain_u[u]]
    kinds = Counter((dt_chain_u[u], sk4_chain_u[u]) for u in differing)
    picked = []  # one example of each kind of difference, most frequent first, then more of them
    for kind, _ in kinds.most_common():
        picked.append(next(u for u in differing if (dt_chain_u[u], sk4_chain_u[u]) == kind))
    picked += [u for u in differing if u not in picked]
    shown = 0
    for u in picked[: args.examples]:
        shown += 1
        label, text = english[u]
        print(f"  {label}: {dt_chain_u[u] or 'keep'} -> {sk4_chain_u[u] or 'keep'}")
        print(f"      {diagnose(text)}")
        if "c4:" in f"{dt_chain_u[u]}{sk4_chain_u[u]}":
            print(f"      {c4_sentences(text)}")
        if "gopher_repetition:" in f"{dt_chain_u[u]}{sk4_chain_u[u]}":
            print(f"      {top_ngrams(text)}")
    if not shown:
        print("  none")
    print()
    if code_version() != version:
        print("WARNING: the filter sources changed while this ran; the numbers may mix two versions")
    print(f"Total wall time {time.perf_counter() - wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
