"""The pipeline flow: the declared stages (``skymoe.pipeline.PIPELINE``), each planned output run as
one Prefect task whose cache key is the output's location (root / stage / fingerprint).

The flow loads the config once; every plan carries that config into its task, so a YAML edited
mid-run cannot change what a running pipeline builds. A rerun with nothing changed is a Prefect
cache hit ("Cached" in the UI) and the stage does not even start; a cache entry is trusted only
while the output's manifest is readable and every file it lists is intact (``check_output``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from skymoe.flows.prefect_env import forward_stage_logs
from prefect import flow, task

from skymoe.config import load_config, merge_overrides, run_overrides
from skymoe.flows.artifacts import publish, publish_progress
from skymoe.pipeline import check_stages, load_stage, run_pipeline, run_summary, stage_range
from skymoe.stage import Plan, Stage, StageResult, check_output, read_manifest, run_plan
from skymoe.storage import Storage

StageName = Literal["clean", "tokenize", "train", "evaluate"]


def _output_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The output's full location: the same fingerprint under another root is another output."""
    return f"skymoe-{parameters['plan'].ref.uri}"


@task(name="stage", cache_key_fn=_output_cache_key, persist_result=True, task_run_name="{plan.name}")
def stage_task(stage: str, plan: Plan, verify: bool = False) -> dict[str, Any]:
    """Run one planned output (a cache hit when its output is intact)."""
    return run_plan(load_stage(stage), plan, Storage.from_config(plan.config.storage), verify).summary()


def execute_as_task(stage: Stage, plan: Plan, storage: Storage, verify: bool = False) -> StageResult:
    """One plan through Prefect, then its artifacts. Prefect's cache is refreshed when the output is
    not intact (its folder deleted, a listed file missing or changed, the manifest unreadable); the
    task then checks it again itself (with ``verify`` unless it was just found intact)."""
    found = check_output(storage, plan.ref, verify)
    started = time.monotonic()
    stage_task.with_options(refresh_cache=not found.intact)(stage.name, plan, verify and not found.intact)
    manifest = found.manifest if found.intact else read_manifest(storage, plan.ref)  # read once when cached
    result = StageResult(stage.name, plan.name, plan.ref, manifest, found.intact,
                         round(time.monotonic() - started, 3))
    publish(result, storage)
    return result


@flow(name="skymoe-pipeline", log_prints=True)
def pipeline_flow(config_path: str | None = None, root: str | None = None, inputs: list[str] | None = None,
                  until: StageName = "evaluate", executor: Literal["config", "datatrove", "beam", "ray"] = "config",
                  from_stage: StageName = "clean", overrides: dict[str, Any] | None = None,
                  verify: bool = False) -> dict[str, Any]:
    """Run the stages from_stage .. until; a stage whose output exists is reused.

    Args:
        config_path: A config file or a preset name (tiny, small, skywork-moe-146b); empty = tiny.
        root: Storage root URI for every stage output (a folder or s3://bucket/prefix); unset (null) = the config's.
        inputs: Input files, folders or globs to clean; unset (null) = the config's clean.inputs.
        until: The last stage to run.
        executor: The cleaning executor; config = the config's clean.executor (every executor writes the same output).
        from_stage: The first stage to run; the stages before it must be complete under the same config and root.
        overrides: Config values that replace the file's, nested as in the YAML (what `--set a.b=c` gives).
        verify: Checksum every file of a reused output; without it only outputs under 64 MiB are checksummed
            (every output's file sizes are checked either way).
    """
    forward_stage_logs()
    wanted = stage_range(from_stage, until)
    chosen = None if executor == "config" else executor
    config = load_config(config_path, merge_overrides(run_overrides(root, inputs, chosen), overrides or {}))
    storage = Storage.from_config(config.storage)
    check_stages(config, storage, wanted)
    results = run_pipeline(config, storage, wanted, execute=execute_as_task, verify=verify)
    evaluations = [result for result in results if result.stage == "evaluate"]
    if evaluations:
        publish_progress(evaluations)
    return run_summary(config.storage.root, results)
