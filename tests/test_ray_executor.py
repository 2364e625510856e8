"""The Ray executor on a real two-node cluster on loopback: the same bytes as datatrove, a worker node
killed with SIGKILL mid-phase, task errors, a local Ray, and an address where nothing answers."""

from __future__ import annotations

import logging
import operator
import os
import secrets
import threading
import time
from functools import partial
from pathlib import Path

import pytest

# Ray reads these when it is first imported, and its node processes inherit them: nodes stay on 127.0.0.1
# (on Linux Ray would otherwise swap in the interface address), nothing phones home, and the cluster, its
# driver and a local Ray share one token (Ray turns token auth on for every local start and keeps the process
# in that mode; a cluster without it would then reject the driver). The token lives in the environment only,
# so nothing is written to ~/.ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import free_port, run_stage, write_config  # noqa: E402
from skymoe.config import ConfigError, ExecutorConfig, load_config  # noqa: E402
from skymoe.pipelines.clean.executors import map_shards  # noqa: E402

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, each its own processes with 1 CPU; shut down at the end of the module."""
    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    """The clean stage with the default datatrove executor: the bytes every Ray run must reproduce."""
    tmp = tmp_path_factory.mktemp("ray-reference")
    config_path = write_config(tmp / "c.yaml", str(tmp / "datatrove"), [str(small_corpus)])
    return config_path, _clean(config_path)


def _clean(config_path: Path, **overrides):
    config = load_config(config_path, overrides or None)
    (result,) = run_stage("clean", config)
    return result


def _on_ray(cluster: Cluster, root: Path) -> dict:
    return {"storage": {"root": str(root)},
            "clean": {"executor": {"kind": "ray", "ray_address": cluster.address, "workers": 2}}}


def _outputs(result) -> tuple:
    """What must match byte for byte: every output file's path, size and checksum, and the counts."""
    manifest = result.manifest
    return manifest.fingerprint, manifest.shards, manifest.extra["rejects"], manifest.counts


def test_ray_cluster_writes_the_same_bytes_as_datatrove(cluster, reference, tmp_path):
    config_path, expected = reference
    result = _clean(config_path, **_on_ray(cluster, tmp_path / "ray"))
    assert not result.cached
    assert _outputs(result) == _outputs(expected)


def test_tokenize_on_the_ray_cluster_writes_the_in_process_bytes(cluster, reference, tmp_path, caplog):
    """The tokenize stage's encode phase as Ray tasks on the cluster (tokenize.executor): the bytes of the
    encode phase run in the stage's own process, in the same fingerprint."""
    config_path, clean = reference
    small = {"tokenizer": {"vocab_size": 600}, "seq_len": 64, "sequences_per_file": 20}

    def tokenize(root: Path, executor: dict | None = None):
        overrides = {"storage": {"root": str(root)},
                     "tokenize": {**small, **({"executor": executor} if executor else {})}}
        (result,) = run_stage("tokenize", load_config(config_path, overrides), upstream={"clean": clean.ref})
        return result

    expected = tokenize(tmp_path / "in-process")
    caplog.set_level(logging.INFO, logger="skymoe.tokenize")
    result = tokenize(tmp_path / "ray", {"kind": "ray", "ray_address": cluster.address, "workers": 2})
    assert not result.cached and "shards to do (ray executor)" in caplog.text
    assert result.manifest.fingerprint == expected.manifest.fingerprint
    assert result.manifest.shards == expected.manifest.shards and result.manifest.counts == expected.manifest.counts
    assert not ray.is_initialized()


def _shard_tasks_running_on(node) -> int:
    """Ray shard tasks executing on ``node`` now: its raylet's worker processes titled ``ray::_ray_shard``."""
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    running = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        running += parent == raylet and title.startswith(b"ray::_ray_shard")
    return running


def test_worker_node_killed_mid_phase_is_retried_byte_identical(cluster, reference, tmp_path):
    """SIGKILL the worker node's raylet (by its PID, through the cluster) while it runs a filter task:
    Ray reruns the lost task on the head node and the run completes with the reference's bytes."""
    config_path, expected = reference
    root = tmp_path / "killed"
    outcome: dict = {}

    def clean() -> None:
        try:
            outcome["result"] = _clean(config_path, **_on_ray(cluster, root))
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    worker = next(iter(cluster.worker_nodes))
    run = threading.Thread(target=clean, daemon=True)
    run.start()
    deadline = time.monotonic() + 240
    while run.is_alive() and not _shard_tasks_running_on(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.is_alive() and _shard_tasks_running_on(worker), f"no task reached the worker node: {outcome}"
    filter_done = root / "clean" / expected.ref.fingerprint / "_done" / "filter"
    done_at_kill = len(list(filter_done.glob("*.json")))
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL to the node's raylet; its workers die with it
    cluster.add_node(**NODE)  # a fresh node joins mid-run, as an autoscaler would bring one
    run.join(timeout=300)
    assert not run.is_alive() and "error" not in outcome, outcome.get("error")
    assert done_at_kill < len(expected.manifest.extra["input_files"])  # the kill landed mid-phase
    assert _outputs(outcome["result"]) == _outputs(expected)


def test_task_error_fails_fast_with_the_original_exception(cluster):
    config = ExecutorConfig(kind="ray", ray_address=cluster.address, workers=2)
    started = time.monotonic()
    with pytest.raises(ZeroDivisionError):  # retry_exceptions=False: a bug is not retried
        map_shards(config, partial(operator.truediv, 1), [1, 0, 2], "divide")
    assert time.monotonic() - started < 60
    assert not ray.is_initialized()  # the driver left the cluster; the cluster itself stays up
    assert cluster.head_node.remaining_processes_alive()


def test_local_ray_is_started_and_shut_down(monkeypatch):
    """No address and no RAY_ADDRESS: a Ray of this process's own, gone after the phase."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ZeroDivisionError):  # raised in a Ray worker of the local instance
        map_shards(ExecutorConfig(kind="ray"), partial(operator.truediv, 1), [0], "local")
    assert not ray.is_initialized()


def test_address_that_does_not_answer_fails_fast_naming_the_setting(monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"clean\.executor\.ray_address='{address}'"):
        map_shards(ExecutorConfig(kind="ray", ray_address=address), partial(operator.truediv, 1), [1], "dead")
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS='{address}'"):
        map_shards(ExecutorConfig(kind="ray"), partial(operator.truediv, 1), [1], "dead")
    assert time.monotonic() - started < 5
    assert not ray.is_initialized()
