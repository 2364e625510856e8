"""The ablation flows: ``skymoe ablate {gating-norm,aux-coef,init,data-quality}``.

Thin on purpose: the logic is in ``ablations/``. Each (variant, seed) training run is one Prefect
task whose cache key is the run's folder, so a rerun shows every finished run as "Cached" and the
task body does not even start; a cache entry is trusted only while the run's done-record exists.
The report (tables, findings, plots inlined) is published as a markdown artifact and written to
``<root>/ablate/<ablation>/report-<size>/``. The data ablation (``data-quality``) first makes each
cleaning variant's clean and tokenize outputs, then trains its runs the same way and adds each run's
held-out loss to its record (``ablations/data_quality.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from skymoe.ablations import data_quality
from skymoe.ablations.report import build_report, write_report
from skymoe.ablations.run import (AblationRun, done_record, execute_plan, plan_ablation, prepare_tokens, size_for,
                                  train_run)
from skymoe.flows.prefect_env import forward_stage_logs
from skymoe.config import StorageConfig, load_config, merge_overrides, run_overrides
from skymoe.storage import Storage

log = logging.getLogger("skymoe.ablate")


def _run_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"skymoe-ablate-{parameters['run'].uri}"


@task(name="ablate-run", cache_key_fn=_run_cache_key, persist_result=True, task_run_name="{run.label}")
def run_task(run: AblationRun, storage_config: StorageConfig) -> dict[str, Any]:
    return train_run(run, storage_config)


# No Prefect cache: the loss is cached as a done-record per run and held-out set (one forward pass to redo).
@task(name="ablate-held-out-loss", task_run_name="held-out loss {run.label}", cache_policy=NO_CACHE)
def held_out_task(plan: Any, run: AblationRun, storage_config: StorageConfig) -> dict[str, Any]:
    return data_quality.held_out_record(Storage.from_config(storage_config), plan, run)


@flow(name="skymoe-ablate", log_prints=True)
def ablate_flow(ablation: Literal["gating-norm", "aux-coef", "init", "data-quality"], config_path: str | None = None,
                root: str | None = None, seeds: int | None = None, size: Literal["smoke", "cpu", "gpu"] = "cpu",
                overrides: dict[str, Any] | None = None, steps: int | None = None) -> dict[str, Any]:
    """Train the missing runs of an ablation, then report on all of them.

    Args:
        ablation: The report's ablation to reproduce, or data-quality: the same model trained on three
            cleanings of one raw corpus, scored on held-out clean text.
        config_path: A config file or a preset name; empty = tiny (its data and tokenizer settings are used).
        root: Storage root URI; unset (null) = the config's.
        seeds: Seeds per variant; unset (null) = the size's (cpu 8, gpu 4, smoke 1). More seeds add only the
            missing runs.
        size: Model and budget: smoke (tests), cpu (~30 min on 2 cores) or gpu.
        overrides: Config values that replace the file's, nested as in the YAML (what `--set a.b=c` gives).
        steps: Training steps of every run of gating-norm or aux-coef; unset (null) = the size's (cpu 120,
            gpu 2000). A longer budget is a separate set of runs and report.
    """
    forward_stage_logs()
    started = time.monotonic()
    config = load_config(config_path, merge_overrides(run_overrides(root), overrides or {}))
    storage = Storage.from_config(config.storage)
    if ablation == "data-quality":
        size_for(ablation, size, steps)  # refuses steps: data-quality has its own budgets
        plan = data_quality.plan_data_quality(config, storage, seeds, size)
    else:
        plan = plan_ablation(config, storage, ablation, prepare_tokens(config, storage), seeds, size, steps)

    def runner(run: AblationRun) -> dict[str, Any]:
        fresh = done_record(storage, run) is None
        record = run_task.with_options(refresh_cache=fresh)(run, config.storage)
        if ablation == "data-quality":
            record = {**record, "held_out": held_out_task(plan, run, config.storage)}
        return record

    records, trained = execute_plan(plan, storage, runner)
    report = data_quality.build_report(plan, storage, records, trained) if ablation == "data-quality" \
        else build_report(plan, storage, records, trained)
    uri = write_report(storage, plan, report)
    create_markdown_artifact(key=f"ablate-{ablation}", markdown=report.inlined(), description=report.title)
    create_table_artifact(key=f"ablate-{ablation}-table", table=report.table, description=report.title)
    log.info("ablate %s: report at %s/report.md", ablation, uri)
    summary = {"ablation": ablation, "size": plan.size, "seeds": plan.seeds, "report": f"{uri}/report.md",
               "runs": len(plan.runs), "trained": trained, "cached": len(plan.runs) - len(trained),
               "table": report.table, "findings": report.findings}
    if ablation == "data-quality":
        summary |= {"corpora": data_quality.corpora_table(plan), "corpus": plan.corpus.uri,
                    "held_out": plan.held_out.describe(),
                    "tokens": {d.variant.name: d.tokens.uri for d in plan.data},
                    "clean": {d.variant.name: d.clean.uri for d in plan.data},
                    "data_cached": {d.variant.name: dict(zip(("clean", "tokenize"), d.cached)) for d in plan.data},
                    "trained_tokens": {f"{name} seed {seed}": record["tokens"]
                                       for (name, seed), record in sorted(records.items())}}
    return summary | {"seconds": round(time.monotonic() - started, 1)}
