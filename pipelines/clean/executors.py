"""Two executors over the same per-shard tasks: datatrove's local executor and Apache Beam.

A shard task is a picklable callable ``task(shard_index)`` that reads one shard, runs the step
objects over it and writes that shard's outputs and done-record. datatrove runs it as one of its
tasks (rank = position in the pending list); Beam runs it as a ``Map`` over the pending shard
indices, in-process with the DirectRunner by default, or on any runner given in ``beam_options``
(e.g. ``--runner=FlinkRunner --environment_type=LOOPBACK``). Output is identical either way
because the work unit and the step objects are the same.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from datatrove.pipeline.base import PipelineStep

from skymoe.config import ExecutorConfig

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
