"""Wall time of the clean stage on the demo corpus: datatrove's local executor against a Ray cluster.

Input and settings: the ``tiny`` preset (``examples/corpus``, 5 files, 2,432 records), its clean stage
run in this process as ``skymoe run --until clean`` runs it (``run_pipeline(config, storage, ("clean",))``),
each run into a fresh root so nothing is a cache hit. Executors, both with ``workers: 2``:
- ``datatrove``: the preset's ``LocalPipelineExecutor`` (2 spawned processes per phase);
- ``ray-cluster``: a running 2-node Ray cluster on loopback (``ray.cluster_utils.Cluster``: a head and a
  worker node, 1 CPU each, separate processes), joined through ``clean.executor.ray_address``. The
  cluster's start is timed apart: a cluster is up before a pipeline uses it;
- ``ray-local`` (``--executors``; not by default): no address, a local Ray started for the stage and stopped after it.
Runs are interleaved (datatrove, ray-cluster, datatrove, ...) so load from other users of the machine falls
on both; every run's data and reject checksums must equal the first run's.

Run: ``python benchmarks/bench_ray_clean.py [--repeats 3] [--executors datatrove,ray-cluster]``
(about 5 minutes with the defaults on 2 shared cores).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from provenance import git_state  # benchmarks/provenance.py, beside this script

from skymoe.config import load_config
from skymoe.pipeline import run_pipeline
from skymoe.storage import Storage

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
PHASES = ("classifier", "filter", "index", "share", "exact", "bands", "near", "clusters", "settle", "lines",
          "apply")


def ray_environment() -> None:
    """Before Ray's first import: nodes and driver on 127.0.0.1, no usage statistics, and one token for the
    cluster, its driver and a local Ray, kept in the environment (see tests/test_ray_executor.py)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)


def start_cluster():
    """The cluster, and its start time. Ray is imported here, not at the top: datatrove's spawned workers
    re-import this module, and would pay for Ray's import in every phase."""
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    return cluster, time.monotonic() - started


def executor_settings(name: str, cluster) -> dict:
    if name == "datatrove":
        return {"kind": "datatrove", "workers": 2}
    if name == "ray-cluster":
        return {"kind": "ray", "workers": 2, "ray_address": cluster.address}
    return {"kind": "ray", "workers": 2, "ray_address": None}


def run_clean(executor: dict, root: Path) -> tuple[float, dict, tuple]:
    """One clean stage into ``root``: wall seconds, phase timings, and the output checksums."""
    config = load_config("tiny", {"storage": {"root": str(root)}, "clean": {"executor": executor}})
    started = time.monotonic()
    (result,) = run_pipeline(config, Storage.from_config(config.storage), ("clean",))
    wall = time.monotonic() - started
    manifest = result.manifest
    checksums = tuple(entry["checksum"] for entry in [*manifest.shards, *manifest.extra["rejects"]])
    return wall, manifest.timings, checksums


def table(walls: dict[str, list[float]], phases: dict[str, list[dict]]) -> str:
    base = statistics.median(walls["datatrove"]) if "datatrove" in walls else None
    header = ["executor", "runs (s)", "median (s)", *PHASES, "vs datatrove"]
    rows = [header]
    for name, runs in walls.items():
        median = statistics.median(runs)
        phase_medians = [f"{statistics.median(t.get(p, 0.0) for t in phases[name]):.1f}" for p in PHASES]
        ratio = f"{median / base:.2f}x" if base else "-"
        rows.append([name, " / ".join(f"{w:.1f}" for w in runs), f"{median:.1f}", *phase_medians, ratio])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--executors", default="datatrove,ray-cluster",
                        help="comma-separated, in run order: datatrove, ray-cluster, ray-local")
    args = parser.parse_args()
    names = args.executors.split(",")
    print(f"{git_state(('pipelines/clean', 'skymoe'))}; load average at start {os.getloadavg()[0]:.1f}")
    cluster = None
    if any(name.startswith("ray") for name in names):
        ray_environment()
    if "ray-cluster" in names:
        cluster, start_s = start_cluster()
        print(f"2-node Ray cluster at {cluster.address} up in {start_s:.1f} s (not in the timings below)")
    walls: dict[str, list[float]] = {name: [] for name in names}
    phases: dict[str, list[dict]] = {name: [] for name in names}
    reference = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-clean-") as tmp:
            for repeat in range(args.repeats):
                for name in names:
                    root = Path(tmp) / f"{name}-{repeat}"
                    wall, timings, checksums = run_clean(executor_settings(name, cluster), root)
                    reference = reference or checksums
                    assert checksums == reference, f"{name} run {repeat} wrote other bytes than the first run"
                    walls[name].append(wall)
                    phases[name].append(timings)
                    print(f"  {name} run {repeat + 1}: {wall:.1f} s")
    finally:
        if cluster is not None:
            cluster.shutdown()
    print(f"\nclean stage, tiny preset, workers 2; outputs identical across all runs; "
          f"load average at end {os.getloadavg()[0]:.1f}\n")
    print(table(walls, phases))


if __name__ == "__main__":
    main()
