"""How well the quality filter separates good from bad pages, on the hand-labelled evaluation set
``examples/quality/eval/`` (issue 14; printed, never asserted).

Input: the set's zh and en documents (labels, kinds and one-line reasons in ``zh.jsonl`` / ``en.jsonl``;
its SOURCE.md says where each comes from). Entries from sources that may not be copied are read from
``../shared/data`` (``--shared-data``); without it they are left out and the counts say so.

(a) Each language's model alone: trained from the config's ``clean.classifier.languages`` example files
    exactly as the stage trains it, then scored on that language's documents. Per language: ROC AUC
    (good = positive class; also without the documents labelled borderline), and precision / recall
    of "good" at 0.5 and at the model's calibrated threshold (the stage's rule).
(b) The whole clean stage: the documents as one JSONL input per language (the set's ids as document
    ids), ``clean`` run with the config's settings through ``run_pipeline`` (no Prefect; a fresh
    root). A document is "kept" when it is in the stage's output. Per language: precision (kept that
    are good), recall (good that are kept), why good documents were dropped (step:reason), which kinds
    of bad documents were kept.
    Also, for the raw Common Crawl pages (``web/chinesewebtext/2021-43_cleared1.jsonl``), every kept
    page with its label, and the share of spam pages (gambling, SEO, spun) kept.
(c) ``--skypile``: the whole clean stage on the SkyPile-150B sample
    (``../shared/data/web/skywork/zh_general.jsonl``, 240 documents SkyPile's pipeline kept): the
    share kept and the reasons for the rest.

Run: ``python benchmarks/bench_quality.py [--config tiny] [--shared-data ../shared/data] [--skypile]
[--json FILE] [--keep DIR]`` (about a minute per clean run on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from provenance import ROOT, git_state  # benchmarks/provenance.py, beside this script

EVAL = ROOT / "examples" / "quality" / "eval"
RAW_CC = "web/chinesewebtext/2021-43_cleared1.jsonl"
SKYPILE = "web/skywork/zh_general.jsonl"
SPAM_KINDS = ("gambling_spam", "seo_spam", "spun_news", "spun_text", "porn_spam", "keyword_stuffing")
MEASURED = ("skymoe/pipelines/clean", "configs", "examples/quality")


def load_eval_set(shared: Path) -> dict[str, list[tuple[dict, str]]]:
    """(entry, text) per language, through the set's own reader (it resolves references)."""
    sys.path.insert(0, str(EVAL))
    from check_eval_set import iter_documents

    return {lang: list(iter_documents(lang, shared)) for lang in ("zh", "en")}


def precision_recall(kept: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    precision = float(good[kept].mean()) if kept.any() else float("nan")
    return precision, float(kept[good].mean()) if good.any() else float("nan")


def classifier_alone(config, documents: dict[str, list[tuple[dict, str]]]) -> dict[str, dict]:
    """Each language's model trained exactly as the stage trains it, scored on that language's documents."""
    from sklearn.metrics import roc_auc_score

    from skymoe.pipelines.clean.classifier import train_quality_model
    from skymoe.storage import Storage

    classifier = config.clean.classifier
    results = {}
    for lang, docs in documents.items():
        if lang not in classifier.languages:
            continue
        model = train_quality_model(Storage(), lang, classifier.languages[lang], classifier)
        good = np.array([entry["label"] == "good" for entry, _ in docs])
        scores = model.score([text for _, text in docs])
        at_half = precision_recall(scores >= 0.5, good)
        at_threshold = precision_recall(scores >= model.threshold, good)
        plain = np.array([not entry.get("borderline") for entry, _ in docs])
        results[lang] = {"docs": len(docs), "good": int(good.sum()), "auc": float(roc_auc_score(good, scores)),
                         "auc_without_borderline": float(roc_auc_score(good[plain], scores[plain])),
                         "p@0.5": at_half[0], "r@0.5": at_half[1], "threshold": model.threshold,
                         "p@threshold": at_threshold[0], "r@threshold": at_threshold[1],
                         "training": model.metrics}
    return results


def run_clean(config_arg: str, inputs: dict[str, list[dict]], workdir: Path) -> dict[str, tuple[str, str] | None]:
    """Every input id -> None (kept) or (step, reason) of its rejection."""
    from skymoe.config import load_config
    from skymoe.pipeline import run_pipeline
    from skymoe.storage import Storage

    folder = workdir / "input"
    folder.mkdir(parents=True)
    for name, rows in inputs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                             encoding="utf-8")
    config = load_config(config_arg, {"storage": {"root": str(workdir / "out")}, "clean": {"inputs": [str(folder)]}})
    (result,) = run_pipeline(config, Storage.from_config(config.storage), ("clean",))
    out = Path(result.ref.uri)
    verdicts: dict[str, tuple[str, str] | None] = {}
    for entry in result.manifest.shards:
        verdicts |= {doc_id: None for doc_id in pq.read_table(out / entry["path"], columns=["id"])["id"].to_pylist()}
    for entry in result.manifest.extra["rejects"]:
        table = pq.read_table(out / entry["path"], columns=["id", "step", "reason"]).to_pylist()
        verdicts |= {row["id"]: (row["step"], row["reason"].split(":", 1)[0]) for row in table}
    return verdicts


def whole_stage(config_arg: str, documents: dict[str, list[tuple[dict, str]]], workdir: Path) -> dict:
    verdicts = run_clean(config_arg, {lang: [{"id": entry["id"], "text": text} for entry, text in docs]
                                      for lang, docs in documents.items()}, workdir)
    results = {}
    for lang, docs in documents.items():
        good = np.array([entry["label"] == "good" for entry, _ in docs])
        kept = np.array([verdicts[entry["id"]] is None for entry, _ in docs])
        precision, recall = precision_recall(kept, good)
        dropped_good = Counter(":".join(verdicts[e["id"]]) for (e, _), k, g in zip(docs, kept, good) if g and not k)
        kept_bad = Counter(e["kind"] for (e, _), k, g in zip(docs, kept, good) if k and not g)
        raw_cc = [(e["id"], e["label"], e["kind"]) for (e, _), k in zip(docs, kept) if k and e["source"] == RAW_CC]
        spam = {e["id"] for e, _ in docs if e["kind"] in SPAM_KINDS and e["source"] == RAW_CC}
        results[lang] = {"docs": len(docs), "good": int(good.sum()), "kept": int(kept.sum()), "precision": precision,
                         "recall": recall, "good_dropped_by": dict(dropped_good.most_common()),
                         "bad_kept_by_kind": dict(kept_bad.most_common()), "raw_cc_kept": raw_cc,
                         "raw_cc_spam_present": len(spam),
                         "raw_cc_spam_kept": sum(1 for doc_id, _, _ in raw_cc if doc_id in spam)}
    return results


def skypile(config_arg: str, shared: Path, workdir: Path) -> dict:
    lines = (shared / SKYPILE).read_text(encoding="utf-8").splitlines()
    rows = [{"id": f"skypile-{n:03d}", "text": json.loads(line)["text"]} for n, line in enumerate(lines, 1)]
    verdicts = run_clean(config_arg, {"skypile": rows}, workdir)
    dropped = Counter(":".join(v) for v in verdicts.values() if v is not None)
    return {"docs": len(rows), "kept": sum(v is None for v in verdicts.values()), "dropped_by": dict(dropped.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="preset or config file whose clean settings are measured")
    parser.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--skypile", action="store_true", help="also clean the SkyPile-150B sample")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--keep", type=Path, help="keep the clean runs' roots in this folder")
    args = parser.parse_args()

    from skymoe.config import load_config

    config = load_config(args.config)
    documents = load_eval_set(args.shared_data)
    print(f"quality evaluation set, {git_state(MEASURED)}; config {args.config}")
    for lang, docs in documents.items():
        total = sum(1 for line in (EVAL / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"  {lang}: {len(docs)} of {total} documents readable"
              f"{'' if len(docs) == total else f' ({args.shared_data} missing: references left out)'}")
    workdir = Path(tempfile.mkdtemp(prefix="skymoe-bench-quality-"))
    try:
        alone = classifier_alone(config, documents)
        print("\n(a) each language's model alone (trained from clean.classifier.languages' example files)")
        print(f"  {'lang':4} {'docs':>5} {'good':>5} {'ROC AUC':>8} {'(no borderline)':>15} {'P@0.5':>6} {'R@0.5':>6} "
              f"{'threshold':>9} {'P@thr':>6} {'R@thr':>6}")
        for lang, r in alone.items():
            print(f"  {lang:4} {r['docs']:5d} {r['good']:5d} {r['auc']:8.3f} {r['auc_without_borderline']:15.3f} "
                  f"{r['p@0.5']:6.3f} {r['r@0.5']:6.3f} {r['threshold']:9.4f} {r['p@threshold']:6.3f} "
                  f"{r['r@threshold']:6.3f}")
            print(f"       trained on {r['training']['positive_docs']} good / {r['training']['negative_docs']} bad; "
                  f"held-out AUC {r['training']['held_out_auc']}")
        stage = whole_stage(args.config, documents, workdir / "eval")
        print("\n(b) the whole clean stage: kept = in the output")
        print(f"  {'lang':4} {'docs':>5} {'good':>5} {'kept':>5} {'precision':>9} {'recall':>7}")
        for lang, r in stage.items():
            print(f"  {lang:4} {r['docs']:5d} {r['good']:5d} {r['kept']:5d} {r['precision']:9.3f} {r['recall']:7.3f}")
            print(f"       good dropped by: {r['good_dropped_by']}")
            print(f"       bad kept, by kind: {r['bad_kept_by_kind']}")
        zh = stage["zh"]
        if zh["raw_cc_spam_present"]:
            print(f"\n  raw Common Crawl (zh, {RAW_CC}): {len(zh['raw_cc_kept'])} pages kept; spam pages kept "
                  f"{zh['raw_cc_spam_kept']} of {zh['raw_cc_spam_present']} present")
            for doc_id, label, kind in zh["raw_cc_kept"]:
                print(f"    {doc_id}  {label:4}  {kind}")
        figures = {"classifier": alone, "stage": stage}
        if args.skypile:
            figures["skypile"] = sky = skypile(args.config, args.shared_data, workdir / "skypile")
            print(f"\n(c) SkyPile-150B sample: kept {sky['kept']} of {sky['docs']} ({sky['kept'] / sky['docs']:.0%}); "
                  f"dropped by: {sky['dropped_by']}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=str))
    finally:
        if args.keep:
            shutil.copytree(workdir, args.keep / workdir.name)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
