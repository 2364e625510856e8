"""``skymoe ablate data-quality`` end to end at the smoke size: the real CLI and Prefect flow, the real clean
stage run three times (three cleanings of one raw corpus), the real tokenize stage, and real 2-rank DeepSpeed
runs; then the held-out loss of each run, the report, and a rerun that is all cache hits."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SMALL_TRAIN, is_verdict, quality_classifier, write_config

from skymoe.ablations import data_quality
from skymoe.config import load_config
from skymoe.flows.cli import main

VARIANTS = ("a-langid-exact", "b-heuristics-neardup", "c-quality-models")


@pytest.fixture(scope="module")
def config(tmp_path_factory, small_corpus):
    """The test corpus, cleaned with calibrated quality models (not the suite's keep-everything threshold);
    the Chinese models learn from every fifth example (1,466 examples take 15 s to train on)."""
    folder = tmp_path_factory.mktemp("data-quality")
    classifier = quality_classifier()
    for side in ("positive", "negative"):
        examples = Path(classifier["languages"]["zh"][side][0]).read_text(encoding="utf-8").splitlines()
        (folder / f"zh_{side}.jsonl").write_text("\n".join(examples[::5]) + "\n", encoding="utf-8")
        classifier["languages"]["zh"][side] = [str(folder / f"zh_{side}.jsonl")]
    return write_config(folder / "config.yaml", str(folder / "out"), [str(small_corpus)], train=SMALL_TRAIN,
                        classifier=classifier)


def ablate(config: Path, *flags: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ablate", "data-quality", "--config", str(config), "--smoke", "--json", *flags]) == 0
    text = out.getvalue()
    return json.loads(text[text.index("{\n"):])


def cleaned_texts(clean_uri: str) -> list[str]:
    manifest = json.loads((Path(clean_uri) / "manifest.json").read_text())
    return [text for entry in manifest["shards"]
            for text in pq.read_table(Path(clean_uri) / entry["path"], columns=["text"]).column("text").to_pylist()]


def test_three_cleanings_same_budget_held_out_loss(prefect_env, config, monkeypatch):
    summary = ablate(config, "--seeds", "1")
    assert sorted(summary["trained"]) == sorted(f"{v} seed 0" for v in VARIANTS)
    assert summary["data_cached"] == {v: {"clean": False, "tokenize": False} for v in VARIANTS}

    # Each cleaning step removes documents: (a) keeps more than (b), (b) more than (c).
    kept = {row["variant"]: row["docs kept"] for row in summary["corpora"]}
    assert kept["a-langid-exact"] > kept["b-heuristics-neardup"] > kept["c-quality-models"] > 0, kept
    assert len({row["docs in"] for row in summary["corpora"]}) == 1  # one raw corpus for all three

    # Same number of training tokens for every variant, whatever its corpus size.
    assert len(set(summary["trained_tokens"].values())) == 1 and min(summary["trained_tokens"].values()) > 0

    # The held-out documents were in the raw inputs (so their removal was real work) and are in no variant's
    # cleaned corpus: checked here without the module's shingle index, by whole text and by a span of each.
    corpus = json.loads(Path(summary["corpus"] + ".json").read_text())
    assert sum(f["held_out_removed"] for f in corpus["files"]) > 0
    shared = data_quality.shared_data()
    examples = [u for side in load_config(str(config)).clean.classifier.languages.values()
                for u in (*side.positive, *side.negative)]
    held_out = data_quality.held_out_documents(shared, examples)
    assert {d.lang for d in held_out.docs} == {"zh", "en"}
    for variant, clean_uri in summary["clean"].items():
        texts = cleaned_texts(clean_uri)
        whole = {" ".join(t.split()) for t in texts}
        joined = "\x00".join(" ".join(t.split()) for t in texts)
        for doc in held_out.docs:
            normal = " ".join(doc.text.split())
            assert normal not in whole, (variant, doc.id)
            middle = normal[len(normal) // 2 - 40: len(normal) // 2 + 40]
            assert len(middle) < 80 or middle not in joined, (variant, doc.id)

    # A row per variant and language, with a verdict from docs/results.md's rule set.
    rows = {(row["variant"], row["language"]): row for row in summary["table"]}
    assert set(rows) == {(v, lang) for v in VARIANTS for lang in ("zh", "en")}
    for (variant, _), row in rows.items():
        assert row["verdict"] == data_quality.REFERENCE if variant == VARIANTS[0] else is_verdict(row["verdict"])
        loss = float(row["held-out loss"].split(" ")[0])
        assert 0 < loss < 20
    assert len(summary["findings"]) == 6 and all(is_verdict(f["status"]) for f in summary["findings"])
    report = Path(summary["report"])
    text = report.read_text()
    assert "## Held-out loss" in text and "## Corpora" in text
    images = re.findall(r"!\[[^]]*\]\((plots/[^)]+)\)", text)
    assert images and all((report.parent / image).stat().st_size > 5000 for image in images)

    # A rerun: no clean or tokenize work, no training, the same table.
    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr("skymoe.ablations.run.execute_run", no_training)
    again = ablate(config, "--seeds", "1")
    assert again["trained"] == [] and again["cached"] == 3
    assert all(stages == {"clean": True, "tokenize": True} for stages in again["data_cached"].values())
    assert again["table"] == summary["table"] and again["clean"] == summary["clean"]


def test_config_without_the_steps_it_compares_fails_before_prefect(config, capsys, tmp_path):
    bad = write_config(tmp_path / "bad.yaml", str(tmp_path / "out"), ["."], classifier={"enabled": False})
    assert main(["ablate", "data-quality", "--config", str(bad), "--smoke"]) == 2
    assert "clean.classifier" in capsys.readouterr().err
