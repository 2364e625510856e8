"""The clean stage's partitioned global phases: same decisions as one process, any partition count,
bounded pieces (partition files), and a kill -9 inside a partitioned phase resumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kill_after_done_records, run_stage, write_config
from skymoe.config import load_config
from skymoe.pipelines.clean.dedup import near_duplicate_clusters
from skymoe.pipelines.clean.partitions import partitioned_writer, read_order_range, read_partition, write_sorted
from skymoe.storage import Storage


def _union_find_reference(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """The definition: documents sharing all rows of any band are linked; the smallest of a cluster is its root."""
    parent = list(range(len(signatures)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for band in range(bands):
        first: dict[bytes, int] = {}
        for i, signature in enumerate(signatures):
            key = signature[band * rows:(band + 1) * rows].tobytes()
            if key in first:
                a, b = find(first[key]), find(i)
                parent[max(a, b)] = min(a, b)
            else:
                first[key] = i
    return np.array([find(i) for i in range(len(signatures))])


@pytest.mark.parametrize("spread", [8, 40, 400])
def test_clusters_from_candidate_pairs_match_union_find(spread):
    rng = np.random.default_rng(spread)
    signatures = rng.integers(0, spread, size=(1500, 4 * 2)).astype(np.uint32)
    expected = _union_find_reference(signatures, 4, 2)
    assert (near_duplicate_clusters(signatures, 4, 2) == expected).all()
    assert 0 < (expected != np.arange(len(expected))).sum() < len(expected)


def test_partitioned_files_keep_every_partition_and_order_ranges(tmp_path):
    storage = Storage()
    schema = pa.schema([("order", pa.int64()), ("value", pa.string())])
    uri = str(tmp_path / "shard.parquet")
    with partitioned_writer(storage, uri, schema, partitions=4) as out:
        out.write(pa.table({"order": [5, 6, 7], "value": ["a", "b", "c"]}, schema=schema), np.array([1, 3, 1]))
        out.write(pa.table({"order": [8], "value": ["d"]}, schema=schema), np.array([1]))
    assert pq.ParquetFile(uri).num_row_groups == 8  # two chunks x four partitions, empty ones included
    assert [t.to_pydict() for t in read_partition(storage, [uri], 1, 4)] == [{"order": [5, 7, 8],
                                                                              "value": ["a", "c", "d"]}]
    assert [t.num_rows for t in read_partition(storage, [uri], 2, 4)] == [0]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        read_partition(storage, [uri], 0, 3)

    sorted_uri = str(tmp_path / "drops.parquet")
    write_sorted(storage, sorted_uri, pa.table({"order": np.arange(200_000, 0, -1, dtype=np.int64)}))
    assert read_order_range(storage, [sorted_uri], 70_000, 70_003)["order"].to_pylist() == [70_000, 70_001, 70_002]


def test_a_failed_streaming_write_leaves_nothing(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "half.parquet")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as handle:
            handle.write(b"PAR1 partial")
            raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def _clean(config_path: Path, **overrides):
    config = load_config(config_path, overrides or None)
    (result,) = run_stage("clean", config, Storage.from_config(config.storage))
    return result


def _documents(result) -> list[dict]:
    return [row for entry in result.manifest.shards
            for row in pq.read_table(Path(result.ref.uri) / entry["path"]).to_pylist()]


def _rejects(result) -> dict[str, tuple[str, str]]:
    return {row["id"]: (row["step"], row["reason"]) for entry in result.manifest.extra["rejects"]
            for row in pq.read_table(Path(result.ref.uri) / entry["path"]).to_pylist()}


def test_partition_count_and_a_kill_inside_a_partitioned_phase_change_nothing(small_corpus, tmp_path):
    config_path = write_config(tmp_path / "c.yaml", str(tmp_path / "one"), [str(small_corpus)])
    one = _clean(config_path, clean={"dedup": {"partitions": 1}})
    many = _clean(config_path, storage={"root": str(tmp_path / "many")}, clean={"dedup": {"partitions": 12}})
    assert _documents(one) == _documents(many) and _rejects(one) == _rejects(many)
    assert one.manifest.counts == many.manifest.counts
    assert {"exact_dedup:duplicate_of", "near_dedup:near_duplicate_of"} <= set(one.manifest.counts["rejects_by_reason"])

    killed_root = tmp_path / "killed"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from test_dedup_partitions import _clean\n"
        "from pathlib import Path\n"
        "_clean(Path(%r), storage={'root': %r}, clean={'dedup': {'partitions': 12}})\n"
    ) % (str(Path(__file__).parent), str(config_path), str(killed_root))
    done_dir = killed_root / "clean" / many.ref.fingerprint / "_done" / "near"
    finished_before = kill_after_done_records(code, done_dir, count=3)
    assert len(finished_before) < 12 and not (done_dir.parent.parent / "manifest.json").exists()
    resumed = _clean(config_path, storage={"root": str(killed_root)}, clean={"dedup": {"partitions": 12}})
    assert _documents(resumed) == _documents(many) and _rejects(resumed) == _rejects(many)
    assert finished_before <= {p.name for p in done_dir.glob("*.json")}
