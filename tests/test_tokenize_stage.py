"""The tokenize stage on real cleaned documents: packing, splits, mixture, resume, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kill_after_done_records, run_stage, with_root, write_config
from skymoe.pipelines.tokenize.stage import STAGE as TOKENIZE_STAGE
from skymoe.pipelines.tokenize.stage import TokenizeError, is_validation
from skymoe.pipelines.tokenize.tokenizer import load_tokenizer, load_tokenizer_folder, save_tokenizer, train_tokenizer
from skymoe.config import load_config
from skymoe.stage import StageRef
from skymoe.storage import Storage

TOKENIZE = {"tokenizer": {"vocab_size": 1000}, "seq_len": 64, "validation_permille": 100,
            "sequences_per_file": 50, "mixture": {"weights": {"en": 0.7, "zh": 0.3}}}


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("tokenize")
    config_path = write_config(tmp / "c.yaml", str(tmp / "out"), [str(small_corpus)])
    config = load_config(config_path, {"tokenize": TOKENIZE})
    (clean,) = run_stage("clean", config, Storage())
    return config, clean.ref


def _with_tokenize(config, root: str | None = None, **overrides):
    """The whole config with its tokenize section changed (and its root, when given)."""
    config = config.model_copy(update={"tokenize": config.tokenize.model_copy(update=overrides)})
    return with_root(config, root) if root else config


def _plan(config, clean_ref: StageRef, root: str | None = None, **overrides):
    (plan,) = TOKENIZE_STAGE.plan(_with_tokenize(config, root, **overrides), Storage(), {"clean": clean_ref})
    return plan


def _tokenize(config, clean_ref: StageRef, root: str | None = None, **overrides):
    (result,) = run_stage("tokenize", _with_tokenize(config, root, **overrides), Storage(), {"clean": clean_ref})
    return result


def _arrow_rows(path: Path) -> list[dict]:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().to_pylist()


def _files(stage_uri: str) -> dict[str, bytes]:
    return {str(p.relative_to(stage_uri)): p.read_bytes() for p in sorted(Path(stage_uri).rglob("*.arrow"))}


def test_rows_splits_and_mixture(cleaned):
    config, clean_ref = cleaned
    result = _tokenize(config, clean_ref)
    manifest, stage = result.manifest, Path(result.ref.uri)
    tokenizer = load_tokenizer(Storage(), str(stage / "tokenizer"))
    eos = tokenizer.token_to_id("</s>")

    rows_seen = 0
    for entry in manifest.extra["index"]:
        rows = _arrow_rows(stage / entry["path"])
        assert len(rows) == entry["sequences"] <= 50
        for row in rows:
            assert len(row["input_ids"]) == 65 and row["lang"] == entry["lang"]
            assert all(0 <= s < 65 for s in row["doc_starts"])
            # every document start follows an EOS (or opens the row)
            assert all(s == 0 or row["input_ids"][s - 1] == eos for s in row["doc_starts"])
        rows_seen += len(rows)
    counts = manifest.counts
    assert rows_seen == counts["train_sequences"] + counts["validation_sequences"]
    assert counts["validation_sequences"] > 0 and counts["train_sequences"] > counts["validation_sequences"]
    assert {e["split"] for e in manifest.extra["index"]} == {"train", "validation"}
    assert manifest.extra["token_dtype"] == "uint16"
    assert manifest.upstream == {"clean": clean_ref.uri} and manifest.inputs == {"clean": clean_ref.fingerprint}

    # Mixture: en is upsampled toward 70% of training tokens, zh subsampled, repeats capped at 5.
    mixture = manifest.extra["mixture"]
    en = sum(v["realised_tokens"] for k, v in mixture.items() if k.startswith("en/"))
    zh = sum(v["realised_tokens"] for k, v in mixture.items() if k.startswith("zh/"))
    assert all(0 < v["repeat"] <= 5 for v in mixture.values())
    assert en / (en + zh) == pytest.approx(0.7, abs=0.01)


def test_validation_split_is_by_document_hash(cleaned):
    config, clean_ref = cleaned
    result = _tokenize(config, clean_ref)
    docs = [row for entry in load_clean_data(clean_ref) for row in entry]
    held_out = [d for d in docs if is_validation(d["id"], d["text"], 100)]
    assert result.manifest.counts["validation_docs"] == len(held_out)
    assert result.manifest.counts["train_docs"] == len(docs) - len(held_out)


def load_clean_data(clean_ref: StageRef) -> list[list[dict]]:
    return [pq.read_table(p).to_pylist() for p in sorted(Path(clean_ref.uri, "data").glob("*.parquet"))]


def test_rerun_is_cached_and_resume_is_byte_identical(cleaned, tmp_path):
    config, clean_ref = cleaned
    reference = _tokenize(config, clean_ref)
    assert _tokenize(config, clean_ref).cached

    root = tmp_path / "crashed"
    first = _tokenize(config, clean_ref, str(root))
    stage = Path(first.ref.uri)
    expected = _files(first.ref.uri)
    assert expected == _files(reference.ref.uri)  # same inputs + config = same bytes anywhere
    # A crash: no manifest, half the units unfinished, one of their files half-written.
    (stage / "manifest.json").unlink()
    records = sorted((stage / "_done" / "encode").glob("*.json"))
    for record in records[: len(records) // 2]:
        record.unlink()
        victim = next(stage.rglob(f"{record.stem}-*.arrow"))
        victim.write_bytes(victim.read_bytes()[:100])
    resumed = _tokenize(config, clean_ref, str(root))
    assert not resumed.cached
    assert _files(resumed.ref.uri) == expected
    assert resumed.manifest.counts == reference.manifest.counts


def test_config_change_moves_the_output(cleaned):
    config, clean_ref = cleaned
    base = _plan(config, clean_ref).ref
    assert _plan(config, clean_ref, seq_len=32).ref != base
    assert _plan(config, clean_ref, encode_batch=1).ref == base  # batching changes no bytes


def test_given_tokenizer_is_used(cleaned, tmp_path):
    config, clean_ref = cleaned
    given = train_tokenizer(["a small given tokenizer", "with its own vocabulary 123"] * 50, 300)
    save_tokenizer(given, Storage(), str(tmp_path / "given"))
    result = _tokenize(config, clean_ref, str(tmp_path / "out"),
                       tokenizer=config.tokenize.tokenizer.model_copy(update={"path": str(tmp_path / "given")}))
    assert result.manifest.extra["vocab_size"] == given.get_vocab_size()
    assert (Path(result.ref.uri) / "tokenizer" / "tokenizer.json").read_text() == given.to_str()


def test_corpus_smaller_than_one_sequence_and_missing_clean_output(cleaned, tmp_path):
    config, clean_ref = cleaned
    with pytest.raises(TokenizeError, match="smaller than one training sequence"):
        _tokenize(config, clean_ref, str(tmp_path / "tiny"), seq_len=10_000_000)
    with pytest.raises(TokenizeError, match="no complete cleaning output"):
        _plan(config, StageRef(str(tmp_path), "clean", "0" * 16), str(tmp_path))


def test_training_reader_and_datasets_read_the_stage_output(cleaned, tmp_path, monkeypatch):
    from skymoe.training.data import TokenReader

    config, clean_ref = cleaned
    result = _tokenize(config, clean_ref)
    stage = Path(result.ref.uri)
    reader = TokenReader(Storage(), result.ref.uri, split="train", seed=3)
    assert reader.num_sequences == result.manifest.counts["train_sequences"]
    uninterrupted = [(k, ids.tolist()) for (k, ids), _ in zip(reader.samples(), range(40))]
    resumed = TokenReader(Storage(), result.ref.uri, split="train", seed=3, consumed_samples=17)
    assert [(k, ids.tolist()) for (k, ids), _ in zip(resumed.samples(), range(23))] == uninterrupted[17:]
    assert set(TokenReader(Storage(), result.ref.uri, split="validation").by_domain()) <= {
        f"{e['lang']}/{e['source']}" for e in result.manifest.extra["index"] if e["split"] == "validation"}

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    files = [str(stage / e["path"]) for e in result.manifest.extra["index"] if e["split"] == "train"]
    loaded = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == reader.num_sequences
    assert loaded[0]["input_ids"] == reader.sequence(0).tolist()
    assert [loaded[i]["doc_starts"] for i in range(5)] == [reader.document_starts(i).tolist() for i in range(5)]


def test_id_type_too_small_for_the_vocabulary_fails_before_work(cleaned, tmp_path):
    from skymoe.pipelines.tokenize.tokenizer import TokenizerError

    config, clean_ref = cleaned
    narrow = _with_tokenize(config, str(tmp_path), token_dtype="uint16",
                            tokenizer=config.tokenize.tokenizer.model_copy(update={"vocab_size": 100_000}))
    with pytest.raises(TokenizerError, match="use uint32"):
        TOKENIZE_STAGE.check(narrow, Storage())
    with pytest.raises(TokenizerError, match="use uint32"):
        TOKENIZE_STAGE.plan(narrow, Storage(), {"clean": clean_ref})
    assert not (tmp_path / "tokenize").exists()


def test_long_documents_span_rows_and_are_counted(cleaned):
    config, clean_ref = cleaned
    counts = _tokenize(config, clean_ref).manifest.counts
    assert counts["docs_longer_than_a_sequence"] > 0  # most cleaned pages exceed 64 tokens
    assert counts.get("empty_docs", 0) == 0  # cleaning never emits empty documents


def test_kill_9_mid_encode_resumes_byte_identical(cleaned, tmp_path):
    config, clean_ref = cleaned
    reference = _tokenize(config, clean_ref)
    root = tmp_path / "killed"
    # encode_batch=1 only slows the run down (it is not part of the fingerprint): room to kill it.
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "from skymoe.config import load_config\n"
        "from skymoe.stage import StageRef\n"
        "from skymoe.storage import Storage\n"
        "from skymoe.pipelines.tokenize.stage import STAGE\n"
        "from skymoe.stage import run_plan\n"
        "config = load_config(Path(%r), {'tokenize': {**%r, 'encode_batch': 1}, 'storage': {'root': %r}})\n"
        "(plan,) = STAGE.plan(config, Storage(), {'clean': StageRef(%r, 'clean', %r)})\n"
        "run_plan(STAGE, plan, Storage())\n"
    ) % (str(Path(__file__).parent), str(Path(clean_ref.root).parent / "c.yaml"), TOKENIZE, str(root),
         clean_ref.root, clean_ref.fingerprint)
    finished = kill_after_done_records(code, root / "tokenize" / reference.ref.fingerprint / "_done" / "encode")
    units = _plan(config, clean_ref, str(root)).work.units
    assert 2 <= len(finished) < len(units)
    resumed = _tokenize(config, clean_ref, str(root))
    assert not resumed.cached
    assert _files(resumed.ref.uri) == _files(reference.ref.uri)
    assert resumed.manifest.counts == reference.manifest.counts


# ------------------------------------------------------------------------------ executors
def _stored(result) -> tuple:
    """What must match byte for byte across executors: every file's path, size and checksum, the index and counts."""
    manifest = result.manifest
    return manifest.fingerprint, manifest.shards, manifest.extra["index"], manifest.counts


@pytest.mark.parametrize("executor", [
    pytest.param({"kind": "datatrove", "workers": 2, "min_shards_per_worker": 1}, id="datatrove-2-workers"),
    pytest.param({"kind": "beam"}, id="beam"),
])
def test_executors_write_the_same_bytes_as_in_process(cleaned, tmp_path, executor, caplog):
    """The encode phase on datatrove's spawned workers and on Beam: the in-process run's bytes, in the
    same fingerprint (the executor is not fingerprinted)."""
    from skymoe.config import ExecutorConfig

    config, clean_ref = cleaned
    reference = _tokenize(config, clean_ref)
    caplog.set_level(logging.INFO, logger="skymoe.tokenize")
    result = _tokenize(config, clean_ref, str(tmp_path / executor["kind"]), executor=ExecutorConfig(**executor))
    assert not result.cached and f"shards to do ({executor['kind']} executor)" in caplog.text
    assert _stored(result) == _stored(reference)
    assert _files(result.ref.uri) == _files(reference.ref.uri)


def test_a_small_run_stays_in_this_process(cleaned, tmp_path, monkeypatch, caplog):
    """Fewer pending shards than min_shards_per_worker per worker: no worker process, no datatrove executor."""
    import skymoe.pipelines.clean.executors as executors
    from skymoe.config import ExecutorConfig

    def no_executor(*args, **kwargs):
        raise AssertionError("map_shards called for a run one local worker does")

    monkeypatch.setattr(executors, "map_shards", no_executor)
    config, clean_ref = cleaned
    units = len(_plan(config, clean_ref).work.units)
    crowded = ExecutorConfig(workers=4, min_shards_per_worker=units + 1)
    caplog.set_level(logging.INFO, logger="skymoe.tokenize")
    result = _tokenize(config, clean_ref, str(tmp_path), executor=crowded)
    assert f"{units} of {units} shards to do, in this process" in caplog.text
    assert _stored(result) == _stored(_tokenize(config, clean_ref))


def test_encode_task_pickles_without_its_tokenizer(cleaned, tmp_path):
    """A Tokenizer pickles (and deep-copies) as its JSON, losing encode_special_tokens: the task leaves it
    behind and the receiving process loads it again, so a literal "</s>" in a page stays text."""
    import copy
    import pickle

    import numpy as np

    from skymoe.pipelines.tokenize.stage import EncodeShard

    config, clean_ref = cleaned
    result = _tokenize(config, clean_ref)
    folder = load_tokenizer_folder(Storage(), result.ref.path("tokenizer"))
    task = EncodeShard(config.tokenize, Storage(), result.ref, _plan(config, clean_ref).work.units, np.dtype(np.uint16),
                       folder)
    expected = folder.tokenizer.encode("a </s> b").ids
    assert folder.eos_id not in expected
    for copied in (pickle.loads(pickle.dumps(task)), copy.deepcopy(task)):
        assert copied.units == task.units and copied.tokenizer is not folder
        assert copied.tokenizer.tokenizer.encode("a </s> b").ids == expected


def test_pack_against_a_plain_loop():
    """Packing (vectorized: one stream, EOS by mask, document starts as one offsets array) matches the
    obvious loop: documents + EOS concatenated, cut into rows, starts listed per row, the tail dropped."""
    import numpy as np

    from skymoe.pipelines.tokenize.packing import pack, rows_table

    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 40, size=60)
    lengths[[5, 17]] = [95, 130]  # documents over several rows
    ids = rng.integers(3, 500, size=int(lengths.sum())).astype(np.uint16)
    stream, starts, at = [], [], 0
    for length in lengths:
        starts.append(len(stream))
        stream += [*ids[at : at + length].tolist(), 1]
        at += length
    row_len = 16
    rows = pack(ids, lengths, 1, row_len, np.dtype(np.uint16))
    count = len(stream) // row_len
    assert rows.ids.tolist() == [stream[r * row_len : (r + 1) * row_len] for r in range(count)]
    assert rows.dropped_tokens == len(stream) - count * row_len
    table = rows_table(rows, "en", "c4", 3, 11).to_pylist()
    assert [row["input_ids"] for row in table] == rows.ids[3:11].tolist()
    in_row = [[s - r * row_len for s in starts if r * row_len <= s < (r + 1) * row_len] for r in range(3, 11)]
    assert [row["doc_starts"] for row in table] == in_row
    assert {row["lang"] for row in table} == {"en"} and {row["source"] for row in table} == {"c4"}
    empty = pack(np.zeros(0, np.uint16), np.zeros(0, np.int64), 1, row_len, np.dtype(np.uint16))
    assert empty.ids.shape == (0, row_len) and empty.dropped_tokens == 0
