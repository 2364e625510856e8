"""Plain-text reports for the command line: what a run made, and what a root holds.

The flows return machine-readable summaries (``--json`` prints them as they are); a person reading
a terminal wants a short table instead, with the few numbers that say whether a stage did what it
should, and the places to look next. Pure functions of those summaries, so they are tested without
running anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skymoe.catalog import StageListing

ABOVE_CHANCE = "*"


# --------------------------------------------------------------------------------------- numbers
def human_bytes(size: int) -> str:
    """Binary units, one decimal: ``512 B``, ``3.4 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """``12.3s`` under a minute, ``4m05s`` under an hour, ``1h02m`` beyond."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def local_minute(timestamp: float) -> str:
    """A Unix time as ISO local time to the minute: when an output was made, not to the millisecond."""
    return datetime.fromtimestamp(timestamp).isoformat(timespec="minutes")


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else str(round(value, 4))
    return str(value)


# ------------------------------------------------------------------------ one line per stage output
def _clean_line(counts: Mapping[str, Any]) -> str:
    return f"{counts['docs_in']:,} -> {counts['docs_out']:,} docs, {counts['rejected']:,} rejected"


def _tokenize_line(counts: Mapping[str, Any]) -> str:
    line = f"{counts['train_tokens']:,} train tokens in {counts['train_sequences']:,} sequences"
    if counts.get("validation_tokens"):
        line += f", {counts['validation_tokens']:,} validation tokens"
    return line


def _train_line(counts: Mapping[str, Any]) -> str:
    line = f"MoE {counts['moe_params_total']:,} params ({counts['moe_params_activated']:,} active)"
    losses = [f"{key.removesuffix('_final_loss')} {value:.2f}" for key, value in counts.items()
              if key.endswith("_final_loss")]
    return f"{line}, final loss {', '.join(losses)}" if losses else line


def _evaluate_line(counts: Mapping[str, Any]) -> str:
    return f"{counts['suites']} suites, {counts['items']:,} items"


_STAGE_LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "clean": _clean_line, "tokenize": _tokenize_line, "train": _train_line, "evaluate": _evaluate_line}


def counts_line(stage: str, counts: Mapping[str, Any]) -> str:
    """The 2-4 counts that say what a stage did. An unknown stage, or counts of another shape (an
    older manifest, an incomplete output's shard counts), show their first few scalar counts."""
    try:
        return _STAGE_LINES[stage](counts)
    except (KeyError, TypeError, ValueError):
        scalars = [(key, value) for key, value in counts.items() if not isinstance(value, (dict, list))]
        return ", ".join(f"{key}={_value(value)}" for key, value in scalars[:4])


def scores_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """``hellaswag 26.0 (chance 25.0), piqa 55.0* (chance 50.0)``: each suite against chance."""
    return ", ".join(_suite_vs_chance(row) for row in rows)


def _suite_vs_chance(row: Mapping[str, Any]) -> str:
    """A generative suite's chance is 0: nothing to compare against, so it is left out."""
    chance = row.get("chance")
    return f"{row['suite']} {_score(row)}" + (f" (chance {chance:.1f})" if chance else "")


def _score(row: Mapping[str, Any], pad: str = "") -> str:
    """A score in percent, marked when above chance; ``pad`` stands in for the mark so digits align."""
    return f"{row['score']:.1f}{ABOVE_CHANCE if row.get('beats_chance') else pad}"


# ----------------------------------------------------------------------------------------- tables
def render_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 right: frozenset[int] = frozenset()) -> list[str]:
    """Aligned columns two spaces apart; columns in ``right`` (numbers) are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in (header, *rows):
        cells = [cell.rjust(width) if i in right else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _relative(uri: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def _model(label: str) -> str:
    """An evaluation's model from its result label: ``final``, ``step-0000040``."""
    return label.removeprefix("evaluate-")


# ------------------------------------------------------------------------------------ run summary
def format_run_summary(summary: Mapping[str, Any], disk: Mapping[str, int] | None = None) -> str:
    """The end of ``skymoe run``: a row per stage result (made now or cached, time, counts, output
    folder relative to the root), the evaluation scores against chance as a suite-by-model table,
    the exported model's folder and the disk use of the outputs in ``disk`` (URI -> bytes)."""
    root, results = summary["root"], summary["results"]
    lines = [f"skymoe run: {len(results)} stage results under {root}"]
    rows = [[result.get("label") or result["stage"], "cached" if result["cached"] else "ran",
             "-" if result["cached"] else human_seconds(result["seconds"]), _relative(result["uri"], root),
             counts_line(result["stage"], result["counts"])] for result in results]
    lines += render_table(["stage", "result", "time", "output", "what"], rows, right=frozenset({2}))
    evaluations = [result for result in results if result["stage"] == "evaluate" and result.get("scores")]
    if evaluations:
        lines += ["", *_score_table(evaluations)]
    lines.append("")
    lines.append(f"exported model (Hugging Face folder): {summary['export']}" if summary.get("export")
                 else "exported model: none (training did not run)")
    lines += [f"{_relative(uri, root)} on disk: {human_bytes(size)}" for uri, size in (disk or {}).items()]
    return "\n".join(lines)


def _score_table(evaluations: Sequence[Mapping[str, Any]]) -> list[str]:
    """Suites down, evaluated models across (final first, then checkpoints), chance beside the suite."""
    by_model = {_model(e["label"]): {row["suite"]: row for row in e["scores"]} for e in evaluations}
    suites = list(dict.fromkeys(row["suite"] for e in evaluations for row in e["scores"]))
    rows = []
    for suite in suites:
        chance = next((scores[suite]["chance"] for scores in by_model.values() if suite in scores), None)
        rows.append([suite, "-" if chance is None else f"{chance:.1f}",
                     *(_score(scores[suite], " ") if suite in scores else "- " for scores in by_model.values())])
    table = render_table(["score (%)", "chance", *by_model], rows, right=frozenset(range(1, len(by_model) + 2)))
    marked = any(row.get("beats_chance") for e in evaluations for row in e["scores"])
    return [*table, f"{ABOVE_CHANCE} above chance by more than two standard errors"] if marked else table


# ------------------------------------------------------------------------------------------ show
def format_listing(listings: Sequence[StageListing], root: str, other_folders: Sequence[str] = ()) -> str:
    """``skymoe show``: one row per output in the order given (pipeline order), with its size on
    disk, when its manifest was written, its state, its key counts, and for an evaluation which
    model it scored (the final export or a checkpoint) and the scores against chance. A damaged
    output or an unreadable manifest is a row like the others, its problems on lines below the table."""
    if not listings:
        return f"no stage outputs under {root}"
    total = sum(item.bytes for item in listings)
    lines = [f"{len(listings)} stage outputs under {root}, {human_bytes(total)} in all"]
    rows = [[item.name, item.fingerprint, _state(item), human_bytes(item.bytes),
             local_minute(item.created_at) if item.created_at is not None else "-", _listing_line(item)]
            for item in listings]
    lines += render_table(["stage", "fingerprint", "state", "size", "created", "what"], rows, right=frozenset({3}))
    for item in listings:
        lines += [f"{item.name}/{item.fingerprint} {item.state}: {problem}" for problem in item.problems]
    if other_folders:
        lines.append(f"also under the root, not stage outputs: {', '.join(other_folders)}")
    return "\n".join(lines)


def _state(item: StageListing) -> str:
    """What a rerun would do with the output: reuse it (complete) or not (the others, in capitals)."""
    state = item.state or ("complete" if item.complete else "incomplete")
    return state if item.complete else state.upper()


def _listing_line(item: StageListing) -> str:
    if item.name == "evaluate" and item.scores:
        return f"{item.label}: {scores_line(item.scores)}"
    return counts_line(item.name, item.counts)


# ---------------------------------------------------------------------------- other flow summaries
def format_fields(summary: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A line per key of a flow's summary (ablate, incremental): nested mappings by dotted key, a
    mapping of plain values on one line, lists of records counted (``--json`` has them whole)."""
    lines = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and any(isinstance(v, (Mapping, list)) for v in value.values()):
            lines += format_fields(value, f"{name}.")
        elif isinstance(value, Mapping):
            lines.append(f"{name}: {', '.join(f'{k} {_value(v)}' for k, v in value.items()) or '-'}")
        elif isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
            lines.append(f"{name}: {len(value)} entries")
        elif isinstance(value, list):
            lines.append(f"{name}: {', '.join(_value(v) for v in value) or '-'}")
        else:
            lines.append(f"{name}: {_value(value)}")
    return lines
