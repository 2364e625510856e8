"""The pipeline flow: each stage is one Prefect task whose cache key is the stage's output location
(root / stage / fingerprint).

The flow plans each stage first (inputs + config -> fingerprint, cheap), so a rerun with nothing
changed is a Prefect cache hit ("Cached" in the UI) and the stage function is not even called. A
cache entry is only trusted while the stage's manifest still exists in storage.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

from skymoe.flows.prefect_env import forward_stage_logs  # offline settings: must precede the first Prefect import
from prefect import Task, flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from skymoe.pipelines.clean.stage import CleanPlan, plan_clean, run_clean
from skymoe.pipelines.tokenize.stage import TokenizePlan, plan_tokenize, run_tokenize
from skymoe import PIPELINE_STAGES as STAGES
from skymoe.config import load_config, run_overrides
from skymoe.stage import StageRef, read_manifest
from skymoe.storage import Storage

if TYPE_CHECKING:
    from skymoe.evaluation.stage import EvalTarget
    from skymoe.training.stage import TrainPlan

def _stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The stage output's full location: same fingerprint under another root is another output."""
    planned = parameters["plan"] if "plan" in parameters else parameters["target"]
    return f"skymoe-{planned.ref.uri}"


@task(name="clean", cache_key_fn=_stage_cache_key, persist_result=True)
def clean_task(config_path: str | None, overrides: dict, plan: CleanPlan) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    result = run_clean(config.clean, Storage.from_config(config.storage), config.storage.root, plan)
    return {"uri": result.ref.uri, "fingerprint": result.ref.fingerprint, "counts": result.manifest.counts,
            "timings": result.manifest.timings, "plots": result.manifest.extra.get("plots", [])}


@task(name="tokenize", cache_key_fn=_stage_cache_key, persist_result=True)
def tokenize_task(config_path: str | None, overrides: dict, plan: TokenizePlan, clean_ref: StageRef) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    result = run_tokenize(config.tokenize, Storage.from_config(config.storage), config.storage.root, clean_ref, plan)
    return {"uri": result.ref.uri, "fingerprint": result.ref.fingerprint, "counts": result.manifest.counts,
            "timings": result.manifest.timings, "mixture": result.manifest.extra["mixture"],
            "plots": result.manifest.extra.get("plots", [])}


@task(name="train", cache_key_fn=_stage_cache_key, persist_result=True)
def train_task(config_path: str | None, overrides: dict, plan: TrainPlan, tokens_ref: StageRef) -> dict[str, Any]:
    from skymoe.training.stage import run_train  # torch and DeepSpeed load only when the train stage is wanted

    config = load_config(config_path, overrides)
    result = run_train(config, Storage.from_config(config.storage), config.storage.root, tokens_ref, plan)
    return {"uri": result.ref.uri, "fingerprint": result.ref.fingerprint, "counts": result.manifest.counts,
            "timings": result.manifest.timings, "runs": result.manifest.extra["runs"],
            "export": f"{result.ref.uri}/{result.manifest.extra['export']}",
            "plots": result.manifest.extra.get("plots", [])}


def _publish_train(summary: dict[str, Any]) -> None:
    counts = summary["counts"]
    rows = [{"run": name, "steps": run["steps"], "tokens": run["tokens"],
             "final train loss": None if run["final_loss"] is None else round(run["final_loss"], 4),
             "final validation loss": "; ".join(f"{d} {v:.3f}" for d, v in (run["final_val_loss"] or {}).items()),
             "seconds": run["seconds"]} for name, run in summary["runs"].items()]
    create_table_artifact(key="train-summary", table=rows, description=(
        f"Train stage {summary['fingerprint']}: MoE {counts['moe_params_total']:,} parameters "
        f"({counts['moe_params_activated']:,} activated), dense {counts['dense_params']:,}; "
        f"Hugging Face export at {summary['export']}"))


@task(name="evaluate", cache_key_fn=_stage_cache_key, persist_result=True, task_run_name="evaluate-{target.label}")
def evaluate_task(config_path: str | None, overrides: dict, target: EvalTarget) -> dict[str, Any]:
    from skymoe.evaluation.stage import run_evaluate

    config = load_config(config_path, overrides)
    result = run_evaluate(config, Storage.from_config(config.storage), target)
    return {"uri": result.ref.uri, "fingerprint": result.ref.fingerprint, "label": target.label,
            "tokens": target.tokens, "counts": result.manifest.counts, "timings": result.manifest.timings,
            "table": result.manifest.extra["table"], "plots": result.manifest.extra["plots"]}


def _publish_evaluate(summary: dict[str, Any]) -> None:
    create_table_artifact(key=f"evaluate-{summary['label']}", table=summary["table"], description=(
        f"Evaluation of {summary['label']} ({summary['tokens']:,} training tokens): score and stderr per suite "
        "(percent), chance level, change against the previous evaluation under this root, and the "
        "Skywork-MoE report's Table 1 row for context"))


def _publish_progress(evaluations: list[dict[str, Any]]) -> None:
    """Score against training tokens over the evaluated checkpoints, inlined in a markdown artifact."""
    from skymoe.evaluation.stage import progress_plot

    png = progress_plot([(e["tokens"], {row["suite"]: row["score"] for row in e["table"]}) for e in evaluations])
    if png is not None:
        create_markdown_artifact(key="evaluate-progress", description="score against training tokens",
                                 markdown=f"![progress](data:image/png;base64,{base64.b64encode(png).decode()})")


def _publish_tokenize(summary: dict[str, Any]) -> None:
    rows = [{"what": key.replace("_", " "), "value": value} for key, value in sorted(summary["counts"].items())]
    rows += [{"what": f"mixture {domain}", "value": f"x{plan['repeat']:.3g}: {plan['tokens']:,} -> "
                                                    f"{plan['realised_tokens']:,} tokens"}
             for domain, plan in summary["mixture"].items()]
    rows += [{"what": "output", "value": summary["uri"]}]
    create_table_artifact(key="tokenize-summary", table=rows,
                          description=f"Tokenize stage {summary['fingerprint']}: sequences, tokens, mixture")


def run_stage(stage_task: Task, storage: Storage, ref: StageRef, *args: Any) -> dict[str, Any]:
    """Call a stage task; its cached result is reused only while the output's manifest exists
    (someone may have deleted the folder since)."""
    fresh = read_manifest(storage, ref) is None
    return stage_task.with_options(refresh_cache=fresh)(*args)


def _publish_plots(stage: str, summary: dict[str, Any], storage: Storage) -> None:
    """A markdown artifact with the stage's PNG plots inlined, so the UI shows them directly."""
    sections = [f"# {stage} `{summary['fingerprint']}`", f"Output: `{summary['uri']}`"]
    for path in summary.get("plots", []):
        png = storage.read_bytes(f"{summary['uri']}/{path}")
        sections.append(f"![{path}](data:image/png;base64,{base64.b64encode(png).decode()})")
    create_markdown_artifact(key=f"{stage}-report", markdown="\n\n".join(sections),
                             description=f"{stage}: plots")


def _publish_clean(summary: dict[str, Any]) -> None:
    counts = summary["counts"]
    rows = [{"what": "documents in", "value": counts["docs_in"]},
            {"what": "documents out", "value": counts["docs_out"]}]
    rows += [{"what": f"out ({lang})", "value": n} for lang, n in counts["docs_out_by_lang"].items()]
    rows += [{"what": f"rejected: {reason}", "value": n} for reason, n in counts["rejects_by_reason"].items()]
    rows += [{"what": "recurring lines cut", "value": counts["lines_cut_recurring"]},
             {"what": "output", "value": summary["uri"]},
             {"what": "manifest", "value": f"{summary['uri']}/manifest.json"}]
    create_table_artifact(key="clean-summary", table=rows,
                          description=f"Cleaning stage {summary['fingerprint']}: counts, rejects by reason, outputs")


def publish(stage: str, summary: dict[str, Any], storage: Storage) -> None:
    """A stage's Prefect artifacts: its summary table and a markdown report with its plots."""
    {"clean": _publish_clean, "tokenize": _publish_tokenize, "train": _publish_train,
     "evaluate": _publish_evaluate}[stage](summary)
    label = f"{stage}-{summary['label']}" if stage == "evaluate" else stage
    create_link_artifact(key=f"{label}-output", link=storage.link(f"{summary['uri']}/manifest.json"),
                         link_text=f"{label} manifest ({summary['uri']})",
                         description=f"{label}: the output's manifest; every file it lists sits beside it")
    if stage != "evaluate":  # one evaluate report per pipeline run, not per evaluated checkpoint
        _publish_plots(stage, summary, storage)


def _run_or_require(stage: str, wanted: tuple[str, ...], stage_task: Task, storage: Storage, ref: StageRef,
                    *args: Any) -> dict[str, Any] | None:
    """Run a wanted stage (a cache hit when done); an upstream stage that is not wanted must be
    complete already, so a single-stage run never silently redoes (or waits on) its inputs."""
    if stage in wanted:
        return run_stage(stage_task, storage, ref, *args)
    if read_manifest(storage, ref) is None:
        raise ValueError(f"from_stage: the {stage} output this run needs is missing ({ref.uri}); "
                         f"run from an earlier stage first")
    return None


@flow(name="skymoe-pipeline", log_prints=True)
def pipeline_flow(config_path: str | None = None, root: str | None = None, inputs: list[str] | None = None,
                  until: str = "evaluate", executor: str | None = None, from_stage: str = "clean") -> dict[str, Any]:
    """Run the stages ``from_stage`` .. ``until``; every stage is skipped when its output already
    exists, and stages before ``from_stage`` must exist (one-stage deployments set both)."""
    forward_stage_logs()
    for name, value in (("until", until), ("from_stage", from_stage)):
        if value not in STAGES:
            raise ValueError(f"{name} must be one of {STAGES}, got {value!r}")
    if STAGES.index(from_stage) > STAGES.index(until):
        raise ValueError(f"from_stage {from_stage!r} comes after until {until!r}")
    overrides = run_overrides(root, inputs, executor)
    config = load_config(config_path, overrides)
    storage = Storage.from_config(config.storage)
    storage.check_writable_root(config.storage.root)

    wanted = STAGES[STAGES.index(from_stage): STAGES.index(until) + 1]
    if "evaluate" in wanted:  # benchmark data problems surface now, not after hours of training
        from skymoe.evaluation.stage import check_inputs

        check_inputs(config)

    summary: dict[str, Any] = {"root": config.storage.root, "stages": {}}
    plan = plan_clean(config.clean, storage, config.storage.root)
    clean_summary = _run_or_require("clean", wanted, clean_task, storage, plan.ref, config_path, overrides, plan)
    if clean_summary is not None:
        publish("clean", clean_summary, storage)
        summary["stages"]["clean"] = clean_summary

    if until == "clean":
        return _done(summary)
    token_plan = plan_tokenize(config.tokenize, storage, config.storage.root, plan.ref)
    tokenize_summary = _run_or_require("tokenize", wanted, tokenize_task, storage, token_plan.ref, config_path,
                                       overrides, token_plan, plan.ref)
    if tokenize_summary is not None:
        publish("tokenize", tokenize_summary, storage)
        summary["stages"]["tokenize"] = tokenize_summary

    if until == "tokenize":
        return _done(summary)
    from skymoe.training.stage import plan_train

    train_plan = plan_train(config, storage, config.storage.root, token_plan.ref)
    train_summary = _run_or_require("train", wanted, train_task, storage, train_plan.ref, config_path, overrides,
                                    train_plan, token_plan.ref)
    if train_summary is not None:
        publish("train", train_summary, storage)
        summary["stages"]["train"] = train_summary

    if until == "train":
        return _done(summary)
    from skymoe.evaluation.stage import plan_evaluate

    evaluations = []
    for target in plan_evaluate(config, storage, config.storage.root, train_plan.ref):
        result = run_stage(evaluate_task, storage, target.ref, config_path, overrides, target)
        publish("evaluate", result, storage)
        evaluations.append(result)
    _publish_plots("evaluate", evaluations[0], storage)
    _publish_progress(evaluations)
    summary["stages"]["evaluate"] = evaluations[0]
    summary["checkpoint_evaluations"] = evaluations[1:]
    return _done(summary)


def _done(summary: dict[str, Any]) -> dict[str, Any]:
    logging.getLogger("skymoe").info("pipeline done: %s", {k: v["uri"] for k, v in summary["stages"].items()})
    return summary
