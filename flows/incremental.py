"""The incremental flow: what landed under the inputs since the last generation goes through the
pipeline, on top of everything before it (see ``flows/generations.py`` for what a generation
is). Deployed on a schedule; with nothing new it is a quick no-op that says so.
"""

from __future__ import annotations

import logging
from typing import Any

from skymoe.flows.prefect_env import forward_stage_logs
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from skymoe import PIPELINE_STAGES
from skymoe.config import load_config, merge_overrides, run_overrides
from skymoe.flows.generations import GenerationRecord, load_ledger, new_record, plan_generation, record_generation
from skymoe.flows.pipeline import execute_as_task
from skymoe.pipeline import check_stages, run_pipeline
from skymoe.storage import Storage

log = logging.getLogger("skymoe.incremental")


@flow(name="skymoe-incremental", log_prints=True)
def incremental_flow(root: str, config_path: str | None = None, input_prefix: str | None = None,
                     train_tokens: int | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the next generation on the files new under input_prefix since the last one.

    Args:
        root: Storage root URI of the series (a folder or s3://bucket/prefix); required, so a schedule
            never writes into a default folder.
        config_path: A config file or a preset name; empty = tiny.
        input_prefix: The folder or prefix new input files land in; unset (null) = the config's clean.inputs.
        train_tokens: Continued-training tokens per generation; unset (null) = the config's incremental.train_tokens.
        overrides: Config values that replace the file's, nested as in the YAML (what `--set a.b=c` gives).
    """
    forward_stage_logs()
    extra = {"incremental": {"train_tokens": train_tokens}} if train_tokens is not None else {}
    config = load_config(config_path, merge_overrides(
        run_overrides(root, [input_prefix] if input_prefix else None), extra, overrides or {}))
    storage = Storage.from_config(config.storage)
    storage.check_writable_root(config.storage.root)
    ledger = load_ledger(storage, config)
    generation = plan_generation(config, storage, ledger)
    if generation is None:
        message = (f"No new files under {', '.join(config.clean.inputs)} since generation "
                   f"{ledger.generations[-1].number}: nothing to do.")
        log.info(message)
        create_markdown_artifact(key="incremental-report", markdown=f"# Incremental run\n\n{message}",
                                 description="incremental rerun: nothing new")
        return {"generation": None, "new_files": 0, "series": ledger.uri}

    log.info("incremental: generation %d, %d new input files", generation.number, len(generation.new_inputs))
    check_stages(config, storage, PIPELINE_STAGES)
    results = run_pipeline(config, storage, execute=execute_as_task, continues=generation.continues)
    record = new_record(generation, results)
    record_generation(storage, ledger, record)
    _publish_report(record)
    return {"generation": record.number, "new_files": len(record.inputs), "series": ledger.uri,
            "outputs": record.outputs, "counts": record.counts}


def _publish_report(record: GenerationRecord) -> None:
    counts = record.counts
    lines = [f"# Incremental generation {record.number}", "", f"{len(record.inputs)} new input files.", "",
             "| what | value |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {value:,} |" for key, value in counts.items() if isinstance(value, int)]
    deltas = counts.get("evaluation_delta", {})
    lines += ["", "| suite | score | change vs previous generation |", "|---|---|---|"]
    lines += [f"| {suite} | {score:.2f} | {'' if deltas.get(suite) is None else f'{deltas[suite]:+.2f}'} |"
              for suite, score in counts["evaluation"].items()]
    create_markdown_artifact(key="incremental-report", markdown="\n".join(lines),
                             description=f"incremental generation {record.number}: counts and evaluation deltas")
