"""The incremental flow: what landed under the inputs since the last generation goes through the
pipeline, on top of everything before it (see ``flows/generations.py`` for what a generation
is). Deployed on a schedule; with nothing new it is a quick no-op that says so.
"""

from __future__ import annotations

import logging
from typing import Any

from skymoe.flows.prefect_env import forward_stage_logs  # offline settings: must precede the first Prefect import
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from skymoe.flows.pipeline import clean_task, evaluate_task, pipeline_flow, publish, run_stage, tokenize_task, train_task
from skymoe.flows.generations import (
    GenerationPlan,
    load_ledger,
    new_record,
    plan_appended_tokens,
    plan_continued_training,
    plan_generation,
    record_generation,
)
from skymoe.config import PipelineConfig, load_config, run_overrides
from skymoe.storage import Storage

log = logging.getLogger("skymoe.incremental")


@flow(name="skymoe-incremental", log_prints=True)
def incremental_flow(config_path: str | None = None, root: str | None = None, input_prefix: str | None = None,
                     train_tokens: int | None = None) -> dict[str, Any]:
    """Run the next generation on the files new under ``input_prefix`` (default: the config's
    ``clean.inputs``); ``train_tokens`` overrides ``incremental.train_tokens``."""
    forward_stage_logs()
    overrides = run_overrides(root, [input_prefix] if input_prefix else None)
    if train_tokens is not None:
        overrides["incremental"] = {"train_tokens": train_tokens}
    config = load_config(config_path, overrides)
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

    log.info("incremental: generation %d, %d new input files", generation.number, len(generation.clean.shards))
    if generation.previous is None:
        outputs, counts = _first_generation(config_path, root, config.clean.inputs)
    else:
        outputs, counts = _next_generation(config, config_path, overrides, storage, generation)
    record_generation(storage, ledger, new_record(generation, outputs, counts))
    _publish_report(generation, counts)
    return {"generation": generation.number, "new_files": len(generation.clean.shards), "series": ledger.uri,
            "outputs": outputs, "counts": counts}


def _first_generation(config_path: str | None, root: str | None, inputs: list[str]) -> tuple[dict, dict]:
    """Generation 0 is the full pipeline on everything (a cache hit where ``skymoe run`` did it)."""
    summary = pipeline_flow(config_path=config_path, root=root, inputs=inputs)
    stages = summary["stages"]
    outputs = {stage: result["fingerprint"] for stage, result in stages.items()}
    counts = {"docs_in": stages["clean"]["counts"]["docs_in"], "docs_kept": stages["clean"]["counts"]["docs_out"],
              "train_tokens_in_shards": stages["tokenize"]["counts"]["train_tokens"],
              "evaluation": {row["suite"]: row["score"] for row in stages["evaluate"]["table"]}}
    return outputs, counts


def _next_generation(config: PipelineConfig, config_path: str | None, overrides: dict, storage: Storage,
                     generation: GenerationPlan) -> tuple[dict, dict]:
    """Clean the new files against the history, append their tokens, train on, evaluate."""
    from skymoe.evaluation.stage import plan_evaluate

    clean = run_stage(clean_task, storage, generation.clean.ref, config_path, overrides, generation.clean)
    publish("clean", clean, storage)
    token_plan = plan_appended_tokens(config, storage, generation)
    tokens = run_stage(tokenize_task, storage, token_plan.ref, config_path, overrides, token_plan,
                       generation.clean.ref)
    publish("tokenize", tokens, storage)
    train_plan = plan_continued_training(config, storage, generation, token_plan.ref)
    train = run_stage(train_task, storage, train_plan.ref, config_path, overrides, train_plan, token_plan.ref)
    publish("train", train, storage)
    target = plan_evaluate(config, storage, config.storage.root, train_plan.ref)[0]  # the continued model
    evaluation = run_stage(evaluate_task, storage, target.ref, config_path, overrides, target)
    publish("evaluate", evaluation, storage)

    outputs = {"clean": clean["fingerprint"], "tokenize": tokens["fingerprint"], "train": train["fingerprint"],
               "evaluate": evaluation["fingerprint"]}
    counts = {"docs_in": clean["counts"]["docs_in"], "docs_kept": clean["counts"]["docs_out"],
              "duplicates_of_earlier": clean["counts"]["duplicates_of_earlier"],
              "train_tokens_appended": tokens["counts"]["appended_train_tokens"],
              "train_tokens_in_shards": tokens["counts"]["train_tokens"],
              "training_steps_added": train["counts"]["continued_steps"],
              "training_tokens_added": train["counts"]["continued_tokens"],
              "evaluation": {row["suite"]: row["score"] for row in evaluation["table"]},
              "evaluation_delta": {row["suite"]: row["delta_vs_previous"] for row in evaluation["table"]}}
    return outputs, counts


def _publish_report(generation: GenerationPlan, counts: dict[str, Any]) -> None:
    lines = [f"# Incremental generation {generation.number}", "",
             f"{len(generation.clean.shards)} new input files.", "", "| what | value |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {value:,} |" for key, value in counts.items() if isinstance(value, int)]
    deltas = counts.get("evaluation_delta", {})
    lines += ["", "| suite | score | change vs previous generation |", "|---|---|---|"]
    lines += [f"| {suite} | {score:.2f} | {'' if deltas.get(suite) is None else f'{deltas[suite]:+.2f}'} |"
              for suite, score in counts["evaluation"].items()]
    create_markdown_artifact(key="incremental-report", markdown="\n".join(lines),
                             description=f"incremental generation {generation.number}: counts and evaluation deltas")
