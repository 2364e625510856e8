#!/usr/bin/env python3
"""Validate the hand-labelled quality evaluation set and print its counts.

Usage (from the repository root):

    python examples/quality/eval/check_eval_set.py [--shared-data ../shared/data]

Checks, per language file (``zh.jsonl``, ``en.jsonl``):

* every line is a JSON object with the required fields and types; ``label`` is
  ``good`` or ``bad``; ``reason`` and ``kind`` are non-empty one-liners;
* ids are unique across both files and carry the file's language prefix;
* no (source, line, field) is labelled twice and no resolved text occurs twice;
* reference-only entries (no ``text``) come from a reference-only source, and
  entries from a reference-only source carry no ``text``;
* when the shared data folder is present: every reference resolves to
  non-empty text, and every copied ``text`` is identical to its source;
* no document overlaps the classifier seeds ``examples/quality/positive.jsonl``
  / ``negative.jsonl`` (exact text, or same first 200 characters);
* the share of ``bad`` is between 40% and 60% per language, and constructed
  documents are at most 30% of the ``bad`` items of a language.

Exits non-zero on any error. Only the standard library is used.

The set is for EVALUATION ONLY (precision/recall/ROC AUC of the quality
classifier and of the clean stage's keep/drop decision). Never train on it.
``iter_documents`` below resolves references so an evaluation command can read
the texts.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
SEEDS = [REPO_ROOT / "examples" / "quality" / "positive.jsonl",
         REPO_ROOT / "examples" / "quality" / "negative.jsonl"]
LANGS = ("zh", "en")

# Sources whose text may not be copied into the project (no licence / research
# only / "do not copy" / Skywork Community License): references only.
REFERENCE_ONLY = {
    "web/chinesewebtext/2021-43_cleared1.jsonl",
    "web/chinesewebtext/fasttext_data_clean.jsonl",
    "web/chinesewebtext/fasttext_data_dirty.jsonl",
    "web/clue/CLUECorpusSmall_sampled.txt",
    "web/skywork/zh_general.jsonl",
}
# Permissive sources whose text is copied into the eval files.
COPYABLE = {
    "web/c4/c4_demo.jsonl",                # C4: ODC-BY 1.0 (LLaMA-Factory repo Apache-2.0)
    "web/dolma/cc_en_head-0091.jsonl",     # Apache-2.0 (allenai/dolma)
    "web/dolma/sample-0000.warc.gz",       # Apache-2.0 (allenai/dolma); needs "record"
    "web/zhwiki/zhwiki_sampled.txt",       # CC BY-SA 4.0
    "web/cmrc2018/cmrc2018_contexts.jsonl",  # CC BY-SA 4.0
}
REQUIRED = {"id": str, "label": str, "reason": str, "kind": str, "source": str}
LABELS = ("good", "bad")


def _read_lines(path: Path) -> List[str]:
    """1-based file lines as `sed -n Np` sees them (split on \\n only)."""
    with open(path, encoding="utf-8", newline="") as f:
        raw = f.read()
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


_cache: Dict[Path, List[str]] = {}


def resolve_text(entry: dict, shared: Path) -> Optional[str]:
    """Text of an entry from the shared data folder, or None if not available."""
    src = entry["source"]
    path = shared / src
    if not path.exists():
        return None
    if src.endswith(".warc.gz"):
        return None  # WARC entries always carry their extracted text
    if path not in _cache:
        _cache[path] = _read_lines(path)
    lines = _cache[path]
    n = entry["line"]
    if not (1 <= n <= len(lines)):
        raise ValueError(f"line {n} out of range for {src} ({len(lines)} lines)")
    line = lines[n - 1]
    field = entry.get("field")
    if field is None:
        return line
    return json.loads(line)[field]


def iter_documents(lang: str, shared: Path = DEFAULT_SHARED,
                   skip_missing: bool = True) -> Iterator[Tuple[dict, str]]:
    """Yield (entry, text) for one language; references are read from `shared`.

    Entries whose text cannot be resolved (shared data absent) are skipped when
    skip_missing is true, otherwise a FileNotFoundError is raised.
    """
    with open(HERE / f"{lang}.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            e = json.loads(line)
            text = e.get("text")
            if text is None:
                text = resolve_text(e, shared)
            if text is None:
                if skip_missing:
                    continue
                raise FileNotFoundError(f"{e['id']}: {shared / e['source']} not available")
            yield e, text


def _seed_keys() -> Tuple[set, set]:
    full, head = set(), set()
    for p in SEEDS:
        if not p.exists():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    t = json.loads(line)["text"]
                    full.add(t)
                    head.add(t[:200])
    return full, head


def check(shared: Path) -> int:
    errors: List[str] = []
    warnings: List[str] = []
    have_shared = shared.is_dir()
    seed_full, seed_head = _seed_keys()
    if not seed_full:
        errors.append("classifier seeds examples/quality/{positive,negative}.jsonl not found")
    seen_ids = set()
    counts = collections.Counter()
    per_lang = {}
    unresolved = 0
    for lang in LANGS:
        path = HERE / f"{lang}.jsonl"
        if not path.exists():
            errors.append(f"{path.name} missing")
            continue
        seen_refs, seen_texts = set(), {}
        n_bad = n_good = n_constructed = n_border = 0
        with open(path, encoding="utf-8") as f:
            rows = [l for l in f.read().split("\n") if l.strip()]
        for i, raw in enumerate(rows, 1):
            where = f"{path.name}:{i}"
            try:
                e = json.loads(raw)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: invalid JSON ({exc})")
                continue
            for k, typ in REQUIRED.items():
                if not isinstance(e.get(k), typ) or not e.get(k).strip():
                    errors.append(f"{where}: field {k!r} missing or empty")
            if errors and errors[-1].startswith(where):
                continue
            eid = e["id"]
            where = f"{path.name}:{i} ({eid})"
            if not eid.startswith(lang + "-"):
                errors.append(f"{where}: id must start with '{lang}-'")
            if eid in seen_ids:
                errors.append(f"{where}: duplicate id")
            seen_ids.add(eid)
            if e["label"] not in LABELS:
                errors.append(f"{where}: label {e['label']!r} not in {LABELS}")
            if "\n" in e["reason"] or "\n" in e["kind"]:
                errors.append(f"{where}: reason/kind must be one line")
            if "borderline" in e and not isinstance(e["borderline"], bool):
                errors.append(f"{where}: borderline must be true/false")
            src = e["source"]
            if src not in REFERENCE_ONLY and src not in COPYABLE:
                errors.append(f"{where}: unknown source {src!r}")
            is_warc = src.endswith(".warc.gz")
            if is_warc:
                if not isinstance(e.get("record"), str) or "text" not in e:
                    errors.append(f"{where}: WARC entries need 'record' and 'text'")
                ref = (src, e.get("record"))
            else:
                if not isinstance(e.get("line"), int) or e["line"] < 1:
                    errors.append(f"{where}: 'line' must be a positive integer")
                    continue
                if "field" not in e or not (e["field"] is None or isinstance(e["field"], str)):
                    errors.append(f"{where}: 'field' must be present (string, or null for .txt)")
                    continue
                if src.endswith(".txt") and e["field"] is not None:
                    errors.append(f"{where}: field must be null for a .txt source")
                ref = (src, e["line"], e["field"])
            if ref in seen_refs:
                errors.append(f"{where}: document {ref} labelled twice")
            seen_refs.add(ref)
            if src in REFERENCE_ONLY and "text" in e:
                errors.append(f"{where}: text copied from reference-only source {src}")
            if src in COPYABLE and "text" not in e and not e.get("constructed"):
                warnings.append(f"{where}: permissive source without copied text")
            if "text" in e and (not isinstance(e["text"], str) or not e["text"].strip()):
                errors.append(f"{where}: empty text")
            # resolve / verify against the shared data
            text = e.get("text")
            if have_shared and not is_warc:
                try:
                    src_text = resolve_text(e, shared)
                except (ValueError, KeyError, json.JSONDecodeError) as exc:
                    errors.append(f"{where}: cannot resolve reference: {exc}")
                    src_text = None
                if src_text is None and (shared / src).exists():
                    errors.append(f"{where}: reference did not resolve")
                elif src_text is not None:
                    if not src_text.strip():
                        errors.append(f"{where}: reference resolves to empty text")
                    if text is not None and not e.get("constructed") and text != src_text:
                        errors.append(f"{where}: copied text differs from {src} line {e['line']}")
                    if text is None:
                        text = src_text
            if text is None:
                unresolved += 1
            else:
                if text in seed_full or text[:200] in seed_head:
                    errors.append(f"{where}: overlaps a classifier seed (positive/negative.jsonl)")
                if text in seen_texts:
                    errors.append(f"{where}: same text as {seen_texts[text]}")
                seen_texts[text] = eid
            lab = e["label"]
            n_bad += lab == "bad"
            n_good += lab == "good"
            n_constructed += bool(e.get("constructed")) and lab == "bad"
            n_border += bool(e.get("borderline"))
            counts[(lang, lab, e["kind"], src)] += 1
        total = n_bad + n_good
        per_lang[lang] = (total, n_good, n_bad, n_border, n_constructed)
        if total:
            share = n_bad / total
            if not 0.40 <= share <= 0.60:
                errors.append(f"{lang}: bad share {share:.1%} outside 40-60%")
            if n_bad and n_constructed / n_bad > 0.30:
                errors.append(f"{lang}: constructed bad items {n_constructed}/{n_bad} exceed 30%")
        if lang in ("zh", "en") and total < 150:
            errors.append(f"{lang}: only {total} documents (need >= 150)")

    # ---- report ----
    print("Quality-filter evaluation set (EVALUATION ONLY - never train on it)")
    print(f"shared data: {shared} ({'present' if have_shared else 'ABSENT: references not resolved'})")
    print()
    print(f"{'lang':4} {'total':>5} {'good':>5} {'bad':>5} {'bad%':>6} {'borderline':>10} {'constructed':>11}")
    for lang, (t, g, b, bo, c) in per_lang.items():
        print(f"{lang:4} {t:5d} {g:5d} {b:5d} {(b / t if t else 0):6.1%} {bo:10d} {c:11d}")
    print()
    print("counts by language x label x kind x source:")
    for (lang, lab, kind, src), n in sorted(counts.items()):
        print(f"  {lang}  {lab:4}  {kind:16}  {src:45}  {n:4d}")
    by_ls = collections.Counter()
    for (lang, lab, kind, src), n in counts.items():
        by_ls[(lang, src, lab)] += n
    print()
    print("counts by language x source x label:")
    for (lang, src, lab), n in sorted(by_ls.items()):
        print(f"  {lang}  {src:45}  {lab:4}  {n:4d}")
    if unresolved:
        print(f"\n{unresolved} reference-only entries not resolved (shared data absent)")
    for w in warnings:
        print("WARNING:", w)
    if errors:
        print(f"\n{len(errors)} error(s):")
        for err in errors:
            print("ERROR:", err)
        return 1
    print("\nOK: all checks passed")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared-data", type=Path,
                    default=Path(os.environ.get("SKYMOE_SHARED_DATA", DEFAULT_SHARED)),
                    help="folder holding the shared web data (default: ../shared/data "
                         "next to the repository)")
    args = ap.parse_args(argv)
    return check(args.shared_data)


if __name__ == "__main__":
    sys.exit(main())
