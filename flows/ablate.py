"""The ablation flows: ``skymoe ablate {gating-norm,aux-coef,init}``.

Thin on purpose: the logic is in ``ablations/``. Each (variant, seed) training run is one Prefect
task whose cache key is the run's folder, so a rerun shows every finished run as "Cached" and the
task body does not even start; a cache entry is trusted only while the run's done-record exists.
The report (tables, findings, plots inlined) is published as a markdown artifact and written to
``<root>/ablate/<ablation>/report-<size>/``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from skymoe.ablations.report import build_report, write_report
from skymoe.ablations.run import AblationRun, done_record, execute_plan, plan_ablation, prepare_tokens, train_run
from skymoe.flows.prefect_env import forward_stage_logs  # offline settings: must precede the first Prefect import
from skymoe.config import StorageConfig, load_config, merge_overrides, run_overrides
from skymoe.storage import Storage

log = logging.getLogger("skymoe.ablate")


def _run_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"skymoe-ablate-{parameters['run'].uri}"


@task(name="ablate-run", cache_key_fn=_run_cache_key, persist_result=True, task_run_name="{run.label}")
def run_task(run: AblationRun, storage_config: StorageConfig) -> dict[str, Any]:
    return train_run(run, storage_config)


@flow(name="skymoe-ablate", log_prints=True)
def ablate_flow(ablation: Literal["gating-norm", "aux-coef", "init"], config_path: str | None = None,
                root: str | None = None, seeds: int = 3, size: Literal["smoke", "cpu", "gpu"] = "cpu",
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the missing runs of an ablation, then report on all of them.

    Args:
        ablation: The report's ablation to reproduce.
        config_path: A config file or a preset name; empty = tiny (its data and tokenizer settings are used).
        root: Storage root URI; empty = the config's.
        seeds: Seeds per variant; more seeds add only the missing runs.
        size: Model and budget: smoke (tests), cpu (~30 min on 2 cores) or gpu.
        overrides: Config values that replace the file's, nested as in the YAML (what `--set a.b=c` gives).
    """
    forward_stage_logs()
    started = time.monotonic()
    config = load_config(config_path, merge_overrides(run_overrides(root), overrides or {}))
    storage = Storage.from_config(config.storage)
    tokens_ref = prepare_tokens(config, storage)
    plan = plan_ablation(config, storage, ablation, tokens_ref, seeds, size)

    def runner(run: AblationRun) -> dict[str, Any]:
        fresh = done_record(storage, run) is None
        return run_task.with_options(refresh_cache=fresh)(run, config.storage)

    records, trained = execute_plan(plan, storage, runner)
    report = build_report(plan, storage, records, trained)
    uri = write_report(storage, plan, report)
    create_markdown_artifact(key=f"ablate-{ablation}", markdown=report.inlined(), description=report.title)
    create_table_artifact(key=f"ablate-{ablation}-table", table=report.table, description=report.title)
    log.info("ablate %s: report at %s/report.md", ablation, uri)
    return {"ablation": ablation, "size": size, "seeds": seeds, "report": f"{uri}/report.md", "runs": len(plan.runs),
            "trained": trained, "cached": len(plan.runs) - len(trained), "table": report.table,
            "findings": report.findings, "seconds": round(time.monotonic() - started, 1)}
