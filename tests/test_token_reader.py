"""The token reader over a hand-built tokenize stage: random access, mixture, sharding, resume, zero copy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from skymoe.training.data import TokenReader, TokenReaderError
from skymoe.stage import Manifest, StageRef, write_manifest
from skymoe.storage import Storage

SEQ_LEN = 7
# (split, lang, source, sequences): file f's row r holds f * 1000 + r * 10 + [0, 8).
FILES = [
    ("train", "en", "c4", 10),
    ("train", "zh", "wiki", 6),
    ("validation", "en", "c4", 3),
    ("validation", "zh", "wiki", 2),
]
MIXTURE = {"en/c4": {"repeat": 2.5}, "zh/wiki": {"repeat": 0.5}}
TRAIN_EPOCH = 25 + 3  # ten en sequences 2.5 times, six zh sequences 0.5 times


def rows(file_index: int, count: int, base: int = 0) -> list[list[int]]:
    return [[base + file_index * 1000 + r * 10 + j for j in range(SEQ_LEN + 1)] for r in range(count)]


def build_stage(root: Path, files=FILES, mixture=MIXTURE, token_dtype: str = "uint16", base: int = 0) -> str:
    """A tokenize stage folder as the stage writes it: Arrow IPC files plus the manifest, last."""
    storage = Storage()
    ref = StageRef(str(root), "tokenize", "0123456789abcdef")
    token_type = pa.uint16() if token_dtype == "uint16" else pa.uint32()
    index = []
    for f, (split, lang, source, count) in enumerate(files):
        ids = rows(f, count, base)
        table = pa.table({
            "input_ids": pa.array(ids, type=pa.list_(token_type)),
            "doc_starts": pa.array([[0, 3]] * count, type=pa.list_(pa.int32())),
            "lang": pa.array([lang] * count),
            "source": pa.array([source] * count),
        })
        relative = f"{split}/test{f}-{lang}-0000.arrow"
        (root / "tokenize" / ref.fingerprint / split).mkdir(parents=True, exist_ok=True)
        with ipc.new_file(str(root / "tokenize" / ref.fingerprint / relative), table.schema) as writer:
            writer.write_table(table, max_chunksize=4)  # several record batches per file
        index.append({"path": relative, "split": split, "lang": lang, "source": source,
                      "sequences": count, "tokens": count * (SEQ_LEN + 1)})
    manifest = Manifest(stage="tokenize", fingerprint=ref.fingerprint, code_version="test", config={}, inputs={},
                        extra={"index": index, "mixture": mixture, "seq_len": SEQ_LEN, "token_dtype": token_dtype})
    write_manifest(storage, ref, manifest)
    return ref.uri


@pytest.fixture()
def stage(tmp_path) -> str:
    return build_stage(tmp_path)


def reader(stage: str, **kwargs) -> TokenReader:
    return TokenReader(Storage(), stage, **kwargs)


def test_random_access_returns_the_written_rows(stage):
    train, validation = reader(stage), reader(stage, split="validation")
    assert (train.num_sequences, validation.num_sequences) == (16, 5)
    expected_train = rows(0, 10) + rows(1, 6)
    expected_validation = rows(2, 3) + rows(3, 2)
    assert [train.sequence(i).tolist() for i in range(16)] == expected_train
    assert [validation.sequence(i).tolist() for i in range(5)] == expected_validation
    assert train.sequence(0).dtype == np.uint16 and train.sequence(0).shape == (SEQ_LEN + 1,)
    with pytest.raises(IndexError):
        train.sequence(16)


def test_epoch_is_the_mixture_expansion(stage):
    train = reader(stage, seed=3)
    assert len(train) == TRAIN_EPOCH
    epochs = [Counter(train.sample_sequence(e * TRAIN_EPOCH + p) for p in range(TRAIN_EPOCH)) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2]  # the fractional subset is the same every epoch
    en = [epochs[0][i] for i in range(10)]
    zh = [epochs[0][i] for i in range(10, 16)]
    assert sorted(en) == [2] * 5 + [3] * 5
    assert sorted(zh) == [0] * 3 + [1] * 3
    other = Counter(reader(stage, seed=4).sample_sequence(p) for p in range(TRAIN_EPOCH))
    assert other != epochs[0]  # the subset follows the seed
    validation = reader(stage, split="validation")
    assert len(validation) == 5  # no mixture on validation
    assert sorted(validation.sample_sequence(p) for p in range(5)) == list(range(5))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cover_each_epoch_once(stage, world):
    epochs = 2
    seen = [list(reader(stage, dp_rank=r, dp_world_size=world).samples(epochs)) for r in range(world)]
    indices = [k for rank in seen for k, _ in rank]
    assert sorted(indices) == list(range(epochs * TRAIN_EPOCH))
    assert all(k % world == r for r, rank in enumerate(seen) for k, _ in rank)
    single = reader(stage)
    expected = Counter(single.sample_sequence(p) for p in range(TRAIN_EPOCH))
    for e in range(epochs):
        got = Counter(tuple(ids.tolist()) for rank in seen for k, ids in rank if k // TRAIN_EPOCH == e)
        assert got == Counter(tuple(single.sequence(i).tolist()) for i in expected.elements())


def test_order_follows_the_seed(stage):
    def order(seed: int) -> list[int]:
        r = reader(stage, seed=seed)
        return [r.sample_sequence(k) for k in range(2 * TRAIN_EPOCH)]

    assert order(7) == order(7)
    assert order(7) != order(8)
    first = order(7)
    assert first[:TRAIN_EPOCH] != first[TRAIN_EPOCH:]  # each epoch is shuffled anew


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("consumed", [10, 27, 29, 31, 56])
def test_resume_yields_the_tail_of_an_uninterrupted_run(stage, world, consumed):
    for rank in range(world):
        full = [(k, ids.tolist()) for k, ids in reader(stage, seed=5, dp_rank=rank, dp_world_size=world).samples(3)]
        resumed = reader(stage, seed=5, dp_rank=rank, dp_world_size=world, consumed_samples=consumed)
        assert [(k, ids.tolist()) for k, ids in resumed.samples(3)] == [(k, ids) for k, ids in full if k >= consumed]


def test_batches_resume_from_state_dict(stage):
    world, batch, steps = 2, 3, 7  # 7 steps of 6 samples cross the epoch boundary at 28
    first = [reader(stage, seed=1, dp_rank=r, dp_world_size=world) for r in range(world)]
    runs = [r.batches(batch) for r in first]
    uninterrupted = [[next(run) for _ in range(steps + 4)] for run in runs]
    assert uninterrupted[0][0].shape == (batch, SEQ_LEN + 1)

    again = [reader(stage, seed=1, dp_rank=r, dp_world_size=world) for r in range(world)]
    runs = [r.batches(batch) for r in again]
    for run in runs:
        for _ in range(steps):
            next(run)
    states = [r.state_dict() for r in again]
    assert states == [{"consumed_samples": steps * batch * world, "seed": 1}] * world
    for rank, state in enumerate(states):
        resumed = reader(stage, seed=state["seed"], dp_rank=rank, dp_world_size=world,
                         consumed_samples=state["consumed_samples"]).batches(batch)
        for expected in uninterrupted[rank][steps:]:
            np.testing.assert_array_equal(next(resumed), expected)


def test_last_batch_of_a_bounded_run_is_short(stage):
    validation = reader(stage, split="validation", dp_rank=1, dp_world_size=2)
    shapes = [b.shape for b in validation.batches(4, epochs=1)]
    assert shapes == [(2, SEQ_LEN + 1)]  # samples 1 and 3 of 5
    assert validation.state_dict()["consumed_samples"] == 5


def test_validation_by_language_and_domain(stage):
    zh = reader(stage, split="validation", lang="zh")
    assert zh.domains == ["zh/wiki"] and len(zh) == 2
    assert sorted(ids.tolist() for _, ids in zh.samples(1)) == rows(3, 2)
    domains = reader(stage, split="validation").by_domain()
    assert {key: len(r) for key, r in domains.items()} == {"en/c4": 3, "zh/wiki": 2}
    assert reader(stage, lang="en", source="c4").domains == ["en/c4"]


def test_local_files_are_memory_mapped_not_copied(stage):
    before = pa.total_allocated_bytes()
    train = reader(stage)
    ids = [train.sequence(i) for i in range(train.num_sequences)]
    assert pa.total_allocated_bytes() == before  # nothing was read into Arrow's memory pool
    assert all(not a.flags.owndata and a.base is not None and not a.flags.writeable for a in ids)
    assert ids[1].ctypes.data - ids[0].ctypes.data == ids[0].nbytes  # rows are adjacent views of one buffer


def test_uint32_ids(tmp_path):
    stage = build_stage(tmp_path, token_dtype="uint32", base=70_000)
    train = reader(stage)
    assert train.sequence(0).dtype == np.uint32
    assert train.sequence(15).tolist() == rows(1, 6, base=70_000)[5]


def test_hugging_face_datasets_loads_the_files(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    files = sorted(str(p) for p in Path(stage).glob("train/*.arrow"))
    loaded = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    train = reader(stage)
    assert loaded["input_ids"] == [train.sequence(i).tolist() for i in range(train.num_sequences)]
    assert set(loaded["lang"]) == {"en", "zh"}


def test_reads_from_s3(tmp_path, s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="token-reader")
    local = build_stage(tmp_path)
    for path in Path(local).rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "token-reader", f"tok/{path.relative_to(local).as_posix()}")
    remote = TokenReader(Storage(s3_endpoint_url=s3_server), "s3://token-reader/tok", seed=2)
    assert [remote.sample(k).tolist() for k in range(30)] == [reader(local, seed=2).sample(k).tolist()
                                                             for k in range(30)]


def test_errors(stage, tmp_path):
    with pytest.raises(TokenReaderError, match="has not completed"):
        reader(str(tmp_path / "nowhere"))
    with pytest.raises(TokenReaderError, match="unknown split"):
        reader(stage, split="test")
    with pytest.raises(TokenReaderError, match="out of range"):
        reader(stage, dp_rank=2, dp_world_size=2)
    with pytest.raises(TokenReaderError, match="no validation files"):
        reader(stage, split="validation", lang="fr")
    empty = build_stage(tmp_path / "empty", files=FILES + [("train", "fr", "cc", 0)],
                        mixture=MIXTURE | {"fr/cc": {"repeat": 1.0}})
    with pytest.raises(TokenReaderError, match="fr/cc have no sequences"):
        reader(empty)
    assert len(reader(empty, lang="en")) == 25  # other domains stay readable
    missing = build_stage(tmp_path / "missing", mixture=MIXTURE | {"de/cc": {"repeat": 1.0}})
    with pytest.raises(TokenReaderError, match="de/cc have no sequences"):
        reader(missing)
    unmixed = build_stage(tmp_path / "unmixed", mixture={"en/c4": {"repeat": 1.0}})
    with pytest.raises(TokenReaderError, match="zh/wiki has no mixture entry"):
        reader(unmixed)
    with pytest.raises(TokenReaderError, match="must be positive"):
        reader(build_stage(tmp_path / "zero", mixture=MIXTURE | {"en/c4": {"repeat": 0}}))
