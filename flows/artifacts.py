"""A stage result's Prefect artifacts: its summary table, a link to its manifest, and its plots.

Everything is read from the manifest, so a cached stage publishes the same artifacts as a fresh
one, and task results stay small.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from skymoe.stage import Manifest, StageResult
from skymoe.storage import Storage


def _clean_rows(manifest: Manifest) -> list[dict[str, Any]]:
    counts = manifest.counts
    rows = [{"what": "documents in", "value": counts["docs_in"]},
            {"what": "documents out", "value": counts["docs_out"]}]
    rows += [{"what": f"out ({lang})", "value": n} for lang, n in counts["docs_out_by_lang"].items()]
    rows += [{"what": f"rejected: {reason}", "value": n} for reason, n in counts["rejects_by_reason"].items()]
    return rows + [{"what": "recurring lines cut", "value": counts["lines_cut_recurring"]}]


def _tokenize_rows(manifest: Manifest) -> list[dict[str, Any]]:
    rows = [{"what": key.replace("_", " "), "value": value} for key, value in sorted(manifest.counts.items())]
    return rows + [{"what": f"mixture {domain}",
                    "value": f"x{plan['repeat']:.3g}: {plan['tokens']:,} -> {plan['realised_tokens']:,} tokens"}
                   for domain, plan in manifest.extra["mixture"].items()]


def _train_rows(manifest: Manifest) -> list[dict[str, Any]]:
    return [{"run": name, "steps": run["steps"], "tokens": run["tokens"],
             "final train loss": None if run["final_loss"] is None else round(run["final_loss"], 4),
             "final validation loss": "; ".join(f"{d} {v:.3f}" for d, v in (run["final_val_loss"] or {}).items()),
             "seconds": run["seconds"]} for name, run in manifest.extra["runs"].items()]


def _evaluate_rows(manifest: Manifest) -> list[dict[str, Any]]:
    return manifest.extra["table"]


_ROWS: dict[str, tuple[Callable[[Manifest], list[dict[str, Any]]], str]] = {
    "clean": (_clean_rows, "documents in and out, rejects by reason"),
    "tokenize": (_tokenize_rows, "sequences, tokens, mixture"),
    "train": (_train_rows, "runs, steps, tokens, final losses"),
    "evaluate": (_evaluate_rows, "score and stderr per suite (percent), chance level, change against the previous "
                                 "evaluation under this root, and the Skywork-MoE report's Table 1 row for context"),
}


def publish(result: StageResult, storage: Storage) -> None:
    """The summary table and manifest link of one result; the plots of all but per-checkpoint evaluations
    (those go into one progress plot, :func:`publish_progress`)."""
    rows, what = _ROWS[result.stage]
    manifest = result.manifest
    create_table_artifact(key=f"{result.label}-summary", table=rows(manifest),
                          description=f"{result.label} `{result.ref.fingerprint}`: {what}")
    create_link_artifact(key=f"{result.label}-output", link=storage.link(result.ref.path("manifest.json")),
                         link_text=f"{result.label} manifest ({result.ref.uri})",
                         description=f"{result.label}: the output's manifest; every file it lists sits beside it")
    if manifest.extra.get("step") is None:
        _publish_plots(result, storage)


# The Prefect server refuses to publish an event over 1.5 MB, and a keyed artifact's event carries
# its whole markdown: plots are split over several artifacts to stay under it.
MAX_ARTIFACT_BYTES = 1_200_000


def _publish_plots(result: StageResult, storage: Storage) -> None:
    """Markdown artifacts with the stage's PNG plots inlined, so the UI shows them directly:
    ``<stage>-report``, then ``<stage>-report-2`` ... when the plots do not fit in one."""
    header = [f"# {result.label} `{result.ref.fingerprint}`", f"Output: `{result.ref.uri}`"]
    parts: list[list[str]] = [list(header)]
    for path in result.manifest.extra.get("plots", []):
        png = base64.b64encode(storage.read_bytes(result.ref.path(path))).decode()
        image = f"![{path}](data:image/png;base64,{png})"
        if len(parts[-1]) > len(header) and sum(map(len, parts[-1])) + len(image) > MAX_ARTIFACT_BYTES:
            parts.append(list(header))
        parts[-1].append(image)
    for n, sections in enumerate(parts, start=1):
        create_markdown_artifact(key=f"{result.stage}-report" + (f"-{n}" if n > 1 else ""),
                                 markdown="\n\n".join(sections),
                                 description=f"{result.label}: plots ({n}/{len(parts)})")


def publish_progress(evaluations: list[StageResult]) -> None:
    """Score against training tokens over the evaluated checkpoints, inlined in a markdown artifact."""
    from skymoe.evaluation.stage import progress_plot

    png = progress_plot([(e.manifest.extra["tokens"], {row["suite"]: row["score"] for row in e.manifest.extra["table"]})
                         for e in evaluations])
    if png is not None:
        create_markdown_artifact(key="evaluate-progress", description="score against training tokens",
                                 markdown=f"![progress](data:image/png;base64,{base64.b64encode(png).decode()})")
