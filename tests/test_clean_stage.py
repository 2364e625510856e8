"""The cleaning stage under the stage contract: outputs, rejects, resume after kill -9, executors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import kill_after_done_records, run_stage, write_config
from skymoe.catalog import list_stage_outputs
from skymoe.config import load_config
from skymoe.pipelines.clean.structured import share_draws, structured_kind
from skymoe.storage import Storage


def _run(config_path: Path, **overrides):
    config = load_config(config_path, overrides or None)
    (result,) = run_stage("clean", config, Storage.from_config(config.storage))
    return result


def _data_bytes(stage_uri: str) -> dict[str, bytes]:
    data = Path(stage_uri) / "data"
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_corpus):
    """One uninterrupted run with the datatrove executor, shared by the comparisons below."""
    tmp = tmp_path_factory.mktemp("reference")
    config_path = write_config(tmp / "c.yaml", str(tmp / "out"), [str(small_corpus)])
    return config_path, _run(config_path)


def test_outputs_counts_and_nothing_lost(reference_run):
    _, result = reference_run
    counts = result.manifest.counts
    assert result.cached is False
    assert counts["docs_in"] == counts["docs_out"] + sum(counts["rejects_by_reason"].values())
    assert set(counts["docs_out_by_lang"]) == {"en", "zh"}
    assert counts["rejects_by_reason"]["exact_dedup:duplicate_of"] >= 1  # the planted copy
    assert counts["rejects_by_reason"]["near_dedup:near_duplicate_of"] >= 1  # the planted near copy
    assert any(s["format"] == "warc" for s in result.manifest.extra["input_files"])
    assert result.stage == result.label == result.manifest.label == "clean"
    assert result.manifest.upstream == {} and result.manifest.fingerprint == result.ref.fingerprint
    manifest_rows = sum(entry["docs"] for entry in result.manifest.shards)
    table_rows = sum(pq.read_table(Path(result.ref.uri) / e["path"]).num_rows for e in result.manifest.shards)
    assert manifest_rows == table_rows == counts["docs_out"]
    rejects = sum(pq.read_table(Path(result.ref.uri) / e["path"]).num_rows for e in result.manifest.extra["rejects"])
    assert rejects == counts["rejected"]
    sample = pq.read_table(Path(result.ref.uri) / result.manifest.shards[0]["path"]).to_pylist()[0]
    assert set(sample) == {"id", "text", "source", "lang", "lang_score", "quality_score", "url", "structured"}


def test_rerun_is_a_cache_hit(reference_run):
    config_path, first = reference_run
    again = _run(config_path)
    assert again.cached and again.ref == first.ref


def test_beam_keeps_exactly_the_same_documents(reference_run, tmp_path):
    config_path, reference = reference_run
    beam = _run(config_path, storage={"root": str(tmp_path / "beam")}, clean={"executor": {"kind": "beam"}})
    assert beam.ref.fingerprint == reference.ref.fingerprint
    assert _data_bytes(beam.ref.uri) == _data_bytes(reference.ref.uri)
    assert beam.manifest.counts == reference.manifest.counts


def test_kill_9_mid_run_resumes_byte_identical(reference_run, tmp_path):
    config_path, reference = reference_run
    root = tmp_path / "killed"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from test_clean_stage import _run\n"
        "from pathlib import Path\n"
        "_run(Path(%r), storage={'root': %r})\n"
    ) % (str(Path(__file__).parent), str(config_path), str(root))
    done_dir = root / "clean" / reference.ref.fingerprint / "_done" / "filter"
    finished_before = kill_after_done_records(code, done_dir)
    stage_dir = root / "clean" / reference.ref.fingerprint
    assert not (stage_dir / "manifest.json").exists()
    assert 2 <= len(finished_before) < 7
    [listing] = list_stage_outputs(Storage(), str(root))  # what `skymoe show` prints for a crashed run
    assert not listing.complete and listing.counts["filter_shards_done"] >= len(finished_before)

    resumed = _run(config_path, storage={"root": str(root)})
    assert not resumed.cached
    assert _data_bytes(resumed.ref.uri) == _data_bytes(reference.ref.uri)
    assert resumed.manifest.counts == reference.manifest.counts
    # Shards finished before the kill were not redone: their done-records are the original files.
    assert finished_before <= {p.name for p in done_dir.glob("*.json")}


def test_manifest_lists_checksums_and_no_credentials(reference_run):
    _, result = reference_run
    text = (Path(result.ref.uri) / "manifest.json").read_text()
    manifest = json.loads(text)
    assert all(entry["checksum"].startswith("xxh3:") for entry in manifest["shards"])
    # One schema for every stage (docs/stage-contract.md); the config slice is a mapping.
    assert set(manifest) == {"stage", "label", "fingerprint", "code_version", "config", "inputs", "upstream",
                             "shards", "counts", "timings", "extra", "created_at"}
    assert manifest["code_version"].startswith("clean-") and isinstance(manifest["config"], dict)
    assert set(manifest["inputs"]) == {entry["uri"] for entry in manifest["extra"]["input_files"]}
    assert "secret" not in text.lower()


def test_same_corpus_elsewhere_gives_the_same_documents(reference_run, small_corpus, tmp_path):
    """Ids, and so everything derived from them, do not depend on where the corpus is mounted."""
    config_path, reference = reference_run
    moved = tmp_path / "elsewhere" / small_corpus.name
    shutil.copytree(small_corpus, moved)
    result = _run(config_path, storage={"root": str(tmp_path / "out")}, clean={"inputs": [str(moved)]})
    assert result.ref.fingerprint != reference.ref.fingerprint  # inputs are located data
    assert sorted(_data_bytes(result.ref.uri).values()) == sorted(_data_bytes(reference.ref.uri).values())


def test_files_split_into_pieces_keep_the_same_documents_in_the_same_order(reference_run, tmp_path):
    """A big file is read as several shards; the documents kept, their ids and order, do not change."""
    config_path, reference = reference_run
    split = _run(config_path, storage={"root": str(tmp_path / "split")}, clean={"reader": {"split_bytes": 16_384}})
    pieces = [item for item in split.manifest.extra["input_files"] if "bytes" in item]
    assert len(pieces) > len({item["uri"] for item in pieces}) > 1
    assert len(split.manifest.shards) > len(reference.manifest.shards)

    def rows(result) -> list[dict]:
        return [row for entry in result.manifest.shards
                for row in pq.read_table(Path(result.ref.uri) / entry["path"]).to_pylist()]

    assert rows(split) == rows(reference)
    assert split.manifest.counts["rejects_by_reason"] == reference.manifest.counts["rejects_by_reason"]


def _structured_documents(count: int) -> list[dict]:
    """JSON records and YAML configs carrying words of real C4 pages, each different enough not to be
    a near-duplicate of another."""
    pages = [json.loads(line)["text"].split() for line in
             (Path(__file__).resolve().parent.parent / "examples/corpus/c4/c4_demo.jsonl").read_text("utf-8").splitlines()]
    pages = [[w.replace(":", "") for w in page] for page in pages[100:] if len(page) >= 70]
    docs = []
    for i in range(count):
        page = pages[i]
        if i % 2:
            text = json.dumps({"id": i, "title": " ".join(page[:6]), "body": " ".join(page[6:60]),
                               "tags": page[60:66]}, indent=2)
        else:
            text = (f"name: doc-{i}\ntitle: {' '.join(page[:5])}\nsettings:\n  summary: {' '.join(page[5:40])}\n"
                    f"  owner: {page[40]}\nitems:\n" + "".join(f"  - {w}\n" for w in page[41:60]))
        docs.append({"id": f"structured-{i}", "text": text})
    return docs


def test_structured_documents_are_kept_at_their_share(tmp_path, small_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    structured = _structured_documents(60)
    assert all(structured_kind(doc["text"]) in ("json", "yaml") for doc in structured)
    (corpus / "structured.jsonl").write_text("".join(json.dumps(d) + "\n" for d in structured), encoding="utf-8")
    config = write_config(tmp_path / "c.yaml", str(tmp_path / "out"), [str(corpus)],
                          structured={"enabled": True, "max_share": 0.05})
    result = _run(config)
    share = result.manifest.extra["structured_share"]
    # Structured documents skip prose language id and rules (they go the code path), so all reach dedup.
    assert share["structured_docs"] == 60 and share["max_share"] == 0.05
    p = share["keep_probability"]
    assert p == pytest.approx(0.05 * (share["docs"] - 60) / (0.95 * 60))
    out = Path(result.ref.uri)
    kept = [row for e in result.manifest.shards for row in pq.read_table(out / e["path"]).to_pylist()
            if row["structured"] is not None]
    # Exactly the documents whose id draws under p are kept, tagged with their kind and language "code".
    expected = {d["id"] for d, draw in zip(structured, share_draws([d["id"] for d in structured])) if draw < p}
    assert {row["id"] for row in kept} == expected and 0 < len(expected) < 60
    assert {(row["structured"], row["lang"]) for row in kept} <= {("json", "code"), ("yaml", "code")}
    assert result.manifest.counts["rejects_by_reason"]["structured_text:over_share"] == 60 - len(expected)
