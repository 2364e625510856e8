"""The pipeline as a declared list of stages, and the one loop every composer iterates.

The pipeline flow, the incremental flow and the ablations all go through :func:`run_pipeline`;
they differ only in how one plan is executed (in this process, or as a Prefect task) and in
whether a generation continues an earlier one. Stages are named here by module, not imported,
so the core stays free of the stages' heavy imports (torch, lm-eval) and of any import back up
the layers: a stage module is loaded only when the loop reaches it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from skymoe import PIPELINE_STAGES
from skymoe.config import ConfigError, PipelineConfig, check_paths
from skymoe.stage import Continuation, Plan, Stage, StageRef, StageResult, check_output, run_plan
from skymoe.storage import Storage


@dataclass(frozen=True)
class StageEntry:
    name: str
    module: str  # defines ``STAGE``, the stage object


PIPELINE: tuple[StageEntry, ...] = (
    StageEntry("clean", "skymoe.pipelines.clean.stage"),
    StageEntry("tokenize", "skymoe.pipelines.tokenize.stage"),
    StageEntry("train", "skymoe.training.stage"),
    StageEntry("evaluate", "skymoe.evaluation.stage"),
)
assert tuple(entry.name for entry in PIPELINE) == PIPELINE_STAGES

Execute = Callable[[Stage, Plan, Storage, bool], StageResult]  # the bool: checksum large outputs on reuse too


def load_stage(name: str) -> Stage:
    entry = next((entry for entry in PIPELINE if entry.name == name), None)
    if entry is None:
        raise ConfigError(f"unknown stage {name!r}: expected one of {', '.join(PIPELINE_STAGES)}")
    return importlib.import_module(entry.module).STAGE


def stage_range(from_stage: str = PIPELINE_STAGES[0], until: str = PIPELINE_STAGES[-1]) -> tuple[str, ...]:
    """The stages ``from_stage`` .. ``until``, with errors that name the parameter."""
    for parameter, value in (("from_stage", from_stage), ("until", until)):
        if value not in PIPELINE_STAGES:
            raise ConfigError(f"{parameter} must be one of {', '.join(PIPELINE_STAGES)}, got {value!r}")
    first, last = PIPELINE_STAGES.index(from_stage), PIPELINE_STAGES.index(until)
    if first > last:
        raise ConfigError(f"from_stage {from_stage!r} comes after until {until!r}")
    return PIPELINE_STAGES[first : last + 1]


def check_stages(config: PipelineConfig, storage: Storage, wanted: Sequence[str]) -> None:
    """Every wanted stage's own checks, before any stage works (a bad benchmark folder should not
    surface after hours of training). Missing files come first: the root is not created for a run that
    cannot start."""
    check_paths(config, wanted)
    storage.check_writable_root(config.storage.root)
    for name in wanted:
        load_stage(name).check(config, storage)


def run_pipeline(config: PipelineConfig, storage: Storage, wanted: Sequence[str] = PIPELINE_STAGES,
                 execute: Execute = run_plan, continues: Continuation | None = None,
                 verify: bool = False) -> list[StageResult]:
    """Plan and run the stages in order up to the last wanted one. A stage before the wanted range is
    planned but not run: its output must be complete and intact already (one-stage runs never redo
    their inputs). ``verify`` checksums every reused output, not only small ones."""
    results: list[StageResult] = []
    upstream: dict[str, StageRef] = {}
    for name in PIPELINE_STAGES[: PIPELINE_STAGES.index(wanted[-1]) + 1]:
        stage = load_stage(name)
        plans = stage.plan(config, storage, upstream, continues)
        for plan in plans:
            if name in wanted:
                results.append(execute(stage, plan, storage, verify))
            elif not (found := check_output(storage, plan.ref, verify)).intact:
                what = "; ".join(found.problems()) or "no manifest"
                raise ConfigError(f"from_stage: the {name} output this run needs is missing or damaged "
                                  f"({plan.ref.uri}: {what}); run from an earlier stage first")
        upstream[name] = plans[0].ref
    return results


def run_summary(root: str, results: list[StageResult]) -> dict[str, Any]:
    """What a pipeline run returns and the CLI prints: one small record per output, and the export."""
    summaries = [result.summary() for result in results]
    export = next((summary["export"] for summary in summaries if "export" in summary), None)
    return {"root": root, "results": summaries, "export": export}
