"""Three executors over the same per-shard tasks: datatrove's local executor, Apache Beam and Ray.

A shard task is a picklable callable ``task(shard_index)`` that reads one shard, runs the step
objects over it and writes that shard's outputs and done-record. datatrove runs it as one of its
tasks (rank = position in the pending list); Beam runs it as a ``Map`` over the pending shard
indices, in-process with the DirectRunner by default, or on any runner given in ``beam_options``
(e.g. ``--runner=FlinkRunner --environment_type=LOOPBACK``); Ray runs it as one remote task per
shard on the cluster at ``ray_address`` (or ``RAY_ADDRESS``, or a local Ray). Output is identical
every way because the work unit and the step objects are the same.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from datatrove.pipeline.base import PipelineStep

from skymoe.config import ConfigError, ExecutorConfig

ShardTask = Callable[[int], None]


class _RunShardTask(PipelineStep):
    """A datatrove step whose rank selects which pending shard the task processes."""

    type = "🧩 skymoe"

    def __init__(self, task: ShardTask, shard_indices: list[int], label: str):
        super().__init__()
        self.task = task
        self.shard_indices = shard_indices
        self.name = label

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from loguru import logger

        logger.disable("datatrove")  # workers start fresh (forkserver): mute per-task banners here too
        self.task(self.shard_indices[rank])
        return iter(())


def map_shards(config: ExecutorConfig, task: ShardTask, shard_indices: list[int], label: str) -> None:
    """Run ``task`` once for each shard index, with the configured executor."""
    if not shard_indices:
        return
    if config.kind == "beam":
        _run_beam(config, task, shard_indices, label)
    elif config.kind == "ray":
        _run_ray(config, task, shard_indices)
    else:
        _run_datatrove(config, task, shard_indices, label)


def _run_datatrove(config: ExecutorConfig, task: ShardTask, shard_indices: list[int], label: str) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from loguru import logger

    logger.disable("datatrove")  # its per-task banners would bury skymoe's own progress lines

    with tempfile.TemporaryDirectory(prefix=f"skymoe-{label}-") as logging_dir:
        executor = LocalPipelineExecutor(
            pipeline=[_RunShardTask(task, shard_indices, label)],
            tasks=len(shard_indices),
            # One worker runs in this process; more are spawned, which only pays with enough shards each
            # (3 small shards of an incremental run: 15 s with 2 workers, 5 s in-process).
            workers=max(1, min(config.workers, len(shard_indices) // config.min_shards_per_worker)),
            logging_dir=logging_dir,
            skip_completed=False,  # skymoe's done-records decide what is finished
            # datatrove's default, forkserver, forks workers from a server started at the first use in
            # this process, with that moment's environment: credentials set later (AWS_*) never reach them.
            start_method="spawn",
        )
        executor.run()


class _BeamShardTask:
    """Wraps the task for ``beam.Map``; failures propagate and fail the Beam pipeline."""

    def __init__(self, task: ShardTask):
        self.task = task

    def __call__(self, shard_index: int) -> int:
        self.task(shard_index)
        return shard_index


def _run_beam(config: ExecutorConfig, task: ShardTask, shard_indices: list[int], label: str) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = list(config.beam_options)
    if not any(opt.startswith("--runner") for opt in options):
        # The in-process runner: the default "DirectRunner" first tries Prism, which downloads a binary.
        options.append("--runner=BundleBasedDirectRunner")
    with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
        (
            pipeline
            | f"{label}: shards" >> beam.Create(shard_indices)
            | f"{label}: reshuffle" >> beam.Reshuffle()
            | f"{label}: run" >> beam.Map(_BeamShardTask(task))
        )


# A task whose worker process or node dies is run again elsewhere, up to this many times; an exception
# raised by the task itself is a bug or bad data, and is not retried (retry_exceptions=False).
RAY_MAX_RETRIES = 3
# How long a cluster address may take to accept a TCP connection: ray.init itself retries a dead
# address for many minutes.
RAY_CONNECT_TIMEOUT_S = 10.0
_HOST_PORT = re.compile(r"^(?:[a-z]+://)?(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d+)$")


def _run_ray(config: ExecutorConfig, task: ShardTask, shard_indices: list[int]) -> None:
    """Run the shard tasks on Ray: in the stage's session (``executor_session``) when one is open, else in a
    connection made for this phase alone."""
    if _ray_session_open():
        import ray

        _ray_map(ray, task, shard_indices, config.workers)
        return
    with executor_session(config):
        _run_ray(config, task, shard_indices)


def _ray_session_open() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextmanager
def executor_session(config: ExecutorConfig) -> Iterator[None]:
    """What an executor keeps across a stage's phases. For Ray: one connection to the configured cluster
    (or one local Ray) for all phases, instead of starting a local Ray per phase.

    ``ray.shutdown()`` at the end ends this driver's job (its tasks stop with it) and, when Ray was started
    here, the local Ray itself; a cluster that was joined keeps running. Other executors keep nothing.
    """
    if config.kind != "ray" or _ray_session_open():
        yield
        return
    address, source = _ray_address(config)
    host_port = _host_port(address) if address is not None else None
    if host_port is not None:
        _check_answers(host_port, address, source)
    ray = _import_ray(loopback=address is None or (host_port is not None and _is_loopback(host_port[0])))
    if address is None:
        # "local": always a new instance, never one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=config.workers, include_dashboard=False)
    else:
        ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()


def _ray_address(config: ExecutorConfig) -> tuple[str | None, str]:
    """The address to join and where it came from (named in errors), or None for a local Ray."""
    if config.ray_address:
        return config.ray_address, "clean.executor.ray_address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an address (``[::1]:6379`` and ``ray://`` forms too); None for ``auto`` and the like,
    which Ray resolves itself."""
    match = _HOST_PORT.match(address)
    return (match["host"].strip("[]"), int(match["port"])) if match else None


def _check_answers(host_port: tuple[str, int], address: str, source: str) -> None:
    """Fail in seconds when nothing listens at the address, instead of inside ray.init's long retries."""
    try:
        with socket.create_connection(host_port, timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(
            f"no Ray cluster answers at {source}={address!r} ({err}): start one (`ray start --head`) or fix {source}"
        ) from None


def _is_loopback(host: str) -> bool:
    """Whether the cluster lives on this machine's loopback, where Ray must be kept from swapping addresses."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _import_ray(loopback: bool) -> ModuleType:
    """Import Ray with this process's settings in place: Ray reads them when it is first imported
    (and its node processes inherit them).

    On Linux Ray swaps 127.0.0.1 for the machine's interface address, so a cluster on loopback would
    not find its own processes; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a local Ray, and a driver that
    joins a loopback cluster, on 127.0.0.1. Usage statistics are off: nothing here may phone home.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


def _ray_shard(task: ShardTask, shard_index: int) -> int:
    """The remote function: module-level, so Ray ships it by reference and workers import it from skymoe."""
    from loguru import logger

    logger.disable("datatrove")  # as in datatrove's workers: its per-step banners would bury the progress lines
    task(shard_index)
    return shard_index


def _ray_map(ray: ModuleType, task: ShardTask, shard_indices: list[int], workers: int) -> None:
    """One Ray task per shard (1 CPU each), at most ``workers`` in flight: ``workers`` keeps meaning the
    most shards processed at once, whatever the cluster's size. The first task error is raised as is."""
    remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(_ray_shard)
    task_ref = ray.put(task)  # serialized once, not once per shard
    shards = iter(shard_indices)
    in_flight = [remote.remote(task_ref, index) for index in itertools.islice(shards, workers)]
    while in_flight:
        finished, in_flight = ray.wait(in_flight, num_returns=1)
        ray.get(finished)
        in_flight += [remote.remote(task_ref, index) for index in itertools.islice(shards, 1)]
