"""The pipeline flow: each stage is one Prefect task whose cache key is the stage's output location
(root / stage / fingerprint).

The flow plans each stage first (inputs + config -> fingerprint, cheap), so a rerun with nothing
changed is a Prefect cache hit ("Cached" in the UI) and the stage function is not even called. A
cache entry is only trusted while the stage's manifest still exists in storage.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from flows.prefect_env import forward_stage_logs  # offline settings: must precede the first Prefect import
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines.clean.stage import CleanPlan, plan_clean, run_clean
from skymoe import PIPELINE_STAGES as STAGES
from skymoe.config import load_config
from skymoe.stage import read_manifest
from skymoe.storage import Storage

IMPLEMENTED = ("clean",)


def _stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The stage output's full location: same fingerprint under another root is another output."""
    return f"skymoe-{parameters['plan'].ref.uri}"


@task(name="clean", cache_key_fn=_stage_cache_key, persist_result=True)
def clean_task(config_path: str | None, overrides: dict, plan: CleanPlan) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    result = run_clean(config.clean, Storage.from_config(config.storage), config.storage.root, plan)
    return {"uri": result.ref.uri, "fingerprint": result.ref.fingerprint, "counts": result.manifest.counts,
            "timings": result.manifest.timings, "plots": result.manifest.extra.get("plots", [])}


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


@flow(name="skymoe-pipeline", log_prints=True)
def pipeline_flow(config_path: str | None = None, root: str | None = None, inputs: list[str] | None = None,
                  until: str = "evaluate", executor: str | None = None) -> dict[str, Any]:
    """Run the stages up to ``until``; every stage is skipped when its output already exists."""
    logger = get_run_logger()
    forward_stage_logs()
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    overrides: dict[str, Any] = {}
    if root:
        overrides["storage"] = {"root": root}
    clean_overrides: dict[str, Any] = {}
    if inputs:
        clean_overrides["inputs"] = inputs
    if executor:
        clean_overrides["executor"] = {"kind": executor}
    if clean_overrides:
        overrides["clean"] = clean_overrides
    config = load_config(config_path, overrides)
    storage = Storage.from_config(config.storage)
    storage.check_writable_root(config.storage.root)

    summary: dict[str, Any] = {"root": config.storage.root, "stages": {}}
    plan = plan_clean(config.clean, storage, config.storage.root)
    fresh = read_manifest(storage, plan.ref) is None
    clean_summary = clean_task.with_options(refresh_cache=fresh)(config_path, overrides, plan)
    _publish_clean(clean_summary)
    _publish_plots("clean", clean_summary, storage)
    summary["stages"]["clean"] = clean_summary

    wanted = STAGES[: STAGES.index(until) + 1]
    missing = [s for s in wanted if s not in IMPLEMENTED]
    if missing:
        logger.warning("stages %s are not part of this skymoe version yet; stopped after %s",
                       ", ".join(missing), IMPLEMENTED[-1])
        summary["not_implemented"] = missing
    logging.getLogger("skymoe").info("pipeline done: %s", {k: v["uri"] for k, v in summary["stages"].items()})
    return summary
