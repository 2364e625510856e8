"""Tables, plots, verdicts and the markdown report of one ablation, from its runs' ``metrics.jsonl``.

Numbers are per variant over seeds: the mean and the sample standard deviation. Findings are decided
by statistics on paired differences (seed s of one variant against seed s of the other: same initial
weights, same data order): a paired t-test with its 95% confidence interval for "lower"/"higher", an
equivalence test (TOST) within a stated margin for "similar"; with one seed nothing is decided
(``decide`` has the rules). Each finding records the effect (mean difference), the interval, the test
and the number of seeds.
"""

from __future__ import annotations

import base64
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from scipy import stats as scipy_stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from skymoe.ablations.gates import SEQUENCES
from skymoe.ablations.run import AblationPlan
from skymoe.plots import figure_png
from skymoe.storage import Storage, join

Rows = list[dict[str, Any]]
Histories = dict[str, list[Rows]]  # variant -> one metrics history per seed
TAIL = 0.1  # "final" training numbers: the mean over the last tenth of the steps (single steps are noisy)


@dataclass
class Report:
    title: str
    markdown: str  # images linked as plots/<name>.png
    plots: dict[str, bytes]
    table: list[dict[str, Any]]
    findings: list[dict[str, str]]

    def inlined(self) -> str:
        """The markdown with every plot as a base64 data URI (a Prefect artifact cannot link files)."""
        return re.sub(r"\]\(plots/([^)]+)\)", lambda m: "](data:image/png;base64,"
                      + base64.b64encode(self.plots[m.group(1)]).decode() + ")", self.markdown)


def histories(storage: Storage, plan: AblationPlan) -> Histories:
    """Each variant's metrics, one history per seed in seed order: index s is seed s for every variant,
    which is what pairs the verdicts' differences."""
    out: dict[str, dict[int, Rows]] = {}
    for run in plan.runs:
        text = storage.read_text(join(run.uri, "metrics.jsonl"))
        out.setdefault(run.variant.name, {})[run.seed] = [json.loads(line) for line in text.splitlines()]
    return {name: [by_seed[seed] for seed in sorted(by_seed)] for name, by_seed in out.items()}


def build_report(plan: AblationPlan, storage: Storage, records: dict[tuple[str, int], dict],
                 trained: list[str]) -> Report:
    runs = histories(storage, plan)
    builder = {"gating-norm": _gating_norm, "aux-coef": _aux_coef, "init": _init}[plan.ablation]
    table, findings, plots, notes = builder(plan, runs, records)
    seconds = sum(record["seconds"] for record in records.values())
    tokens = {v.name: v.phase.steps * plan.tokens_per_step for v in plan.variants}
    title = f"Ablation {plan.ablation} ({plan.size} size, {plan.seeds} seed{'s' * (plan.seeds > 1)})"
    setup = (f"Tokens: `{plan.tokens_ref.uri}`; {plan.tokens_per_step:,} tokens per step; {len(plan.runs)} runs "
             f"({len(plan.runs) - len(trained)} cached, {len(trained)} trained now); {seconds / 60:.1f} minutes of "
             "training in all.")
    budgets = "Budgets: " + ", ".join(f"{v.name} {v.phase.steps} steps ({tokens[v.name]:,} tokens)"
                                      for v in plan.variants) + "."
    method = ("Mean ± sample standard deviation over seeds; final training numbers are means over the last "
              f"{TAIL:.0%} of the steps; validation loss is the mean over languages and sources at the end.")
    seeds = (f"Seeds: {plan.seeds} per variant, paired: seed s gives every variant the same initial weights and "
             "data order (an upcycled run starts from the dense run of its own seed).")
    lines = [f"# {title}", "", setup, "", budgets, "", method, "", "## Results", "", seeds, "",
             _markdown_table(table), "", "## Findings", "", VERDICT_RULES, "", findings_table(findings), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "## Plots", ""] + [f"![{name}](plots/{name})" for name in plots]
    return Report(title, "\n".join(lines) + "\n", plots, table, findings)


VERDICT_RULES = (
    "Each finding is tested on the per-seed differences between its two variants (seed s against seed s). "
    "\"Lower\"/\"higher\": a paired t-test at 5% - reproduced when the 95% confidence interval of the mean "
    "difference lies on the report's side of 0, not reproduced when it lies on the other side, inconclusive when "
    "it contains 0. \"Similar\": equivalence within the stated margin by TOST (two one-sided tests at 5%: the 90% "
    "interval inside ±margin); not finding a difference is not similarity. With one seed nothing is decided.")


def findings_table(findings: list[dict[str, str]]) -> str:
    """The findings as a markdown table: what was measured, the effect with its 95% CI, the test, the verdict."""
    return _markdown_table([{"finding": f["finding"], "measured": f["measured"], "effect": f["effect"],
                             "95% CI": f["95% CI"], "test": f["test"], "seeds": f["seeds"],
                             "verdict": f"**{f['status']}**"} for f in findings])


def write_report(storage: Storage, plan: AblationPlan, report: Report) -> str:
    """``report.md`` and ``plots/*.png`` under the ablation's report folder; its URI."""
    for name, png in report.plots.items():
        storage.write_bytes(join(plan.report_uri, "plots", name), png)
    storage.write_text(join(plan.report_uri, "report.md"), report.markdown)
    storage.write_text(join(plan.report_uri, "summary.json"), json.dumps(
        {"table": report.table, "findings": report.findings}, indent=1))
    return plan.report_uri


# ----------------------------------------------------------------------------------- statistics
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced at this scale"
INCONCLUSIVE = "inconclusive (the 95% CI includes 0)"
NOT_SHOWN_EQUIVALENT = "inconclusive (the 90% CI reaches past the margin)"
NOT_DECIDED = "not decided"  # followed by the reason in parentheses
ONE_SEED = f"{NOT_DECIDED} (1 seed)"
STATUSES = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_SHOWN_EQUIVALENT, ONE_SEED)  # or "not decided (...)"
PAIRED_T = "paired t-test (two-sided, 5%)"
ONE_SAMPLE_T = "one-sample t-test over seeds (two-sided, 5%)"
TOST = "TOST: two one-sided paired t-tests (5% each)"
DIRECTIONS = ("lower", "higher", "similar")


@dataclass(frozen=True)
class Interval:
    """A t-interval on the mean of per-seed differences (paired: seed s of both variants)."""

    n: int
    effect: float  # the mean difference
    low: float
    high: float
    p: float  # two-sided p-value of "mean difference = 0"


def t_interval(diffs: list[float], level: float = 0.95) -> Interval:
    """The ``level`` t-interval of the mean of ``diffs`` (n >= 2). Differences that are all equal give a
    zero-width interval: no seed-to-seed noise, so any non-zero difference is certain."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 differences, got {n}")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0.0:
        return Interval(n, mean, mean, mean, 1.0 if mean == 0.0 else 0.0)
    se = sd / math.sqrt(n)
    half = float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * se
    p = float(2 * scipy_stats.t.sf(abs(mean) / se, n - 1))
    return Interval(n, mean, mean - half, mean + half, p)


def decide(diffs: list[float], expect: str, margin: float | None = None) -> tuple[str, Interval | None]:
    """The verdict on per-seed differences ``a_s - b_s`` for the claim "a is ``expect`` than b", and the
    95% interval (None with one seed, where nothing can be decided).

    lower / higher: the paired t-test at 5%: reproduced when the 95% CI lies on the claimed side of 0,
    not reproduced when it lies on the other side, inconclusive when it contains 0.
    similar: equivalence within +-``margin`` by TOST at 5%: reproduced when the 90% CI lies inside the
    margin; not reproduced when it lies wholly outside it (a difference larger than the margin);
    otherwise inconclusive - failing to find a difference is not evidence of similarity."""
    if expect not in DIRECTIONS:
        raise ValueError(f"expected one of {', '.join(DIRECTIONS)}, got {expect!r}")
    if expect == "similar" and (margin is None or not margin > 0):
        raise ValueError(f"a 'similar' finding needs a positive equivalence margin, got {margin!r}")
    if len(diffs) < 2:
        return ONE_SEED, None
    ci = t_interval(diffs, 0.95)
    if expect == "similar":
        tost = t_interval(diffs, 0.90)
        if -margin < tost.low and tost.high < margin:
            return REPRODUCED, ci
        if tost.low >= margin or tost.high <= -margin:
            return NOT_REPRODUCED, ci
        return NOT_SHOWN_EQUIVALENT, ci
    if ci.low <= 0.0 <= ci.high:
        return INCONCLUSIVE, ci
    return REPRODUCED if (ci.high < 0.0) == (expect == "lower") else NOT_REPRODUCED, ci


def verdict(finding: str, diffs: list[float], expect: str, measured: str, test: str,
            margin: float | None = None) -> dict[str, str]:
    """A finding's record: status, what was measured, the effect (mean difference), its 95% CI, the test
    and the number of seeds. Non-finite values (a diverged run) are reported, not tested."""
    if not all(math.isfinite(d) for d in diffs):
        bad = ", ".join(str(seed) for seed, d in enumerate(diffs) if not math.isfinite(d))
        return undecided(finding, f"{NOT_DECIDED} (non-finite values in seed {bad})", measured, test, len(diffs))
    status, ci = decide(diffs, expect, margin)
    if expect == "similar":
        test = f"{test}, margin ±{margin:g}"
        if ci is not None:
            tost = t_interval(diffs, 0.90)
            measured += f"; 90% CI [{tost.low:+.3g}, {tost.high:+.3g}] against ±{margin:g}"
    elif ci is not None:
        measured += f"; p = {ci.p:.2g}"
    return {"finding": finding, "status": status, "measured": measured,
            "effect": f"{statistics.fmean(diffs):+.3g}",
            "95% CI": "" if ci is None else f"[{ci.low:+.3g}, {ci.high:+.3g}]", "test": test,
            "seeds": str(len(diffs))}


def undecided(finding: str, status: str, measured: str, test: str, seeds: int) -> dict[str, str]:
    """A finding's record when there is nothing to test: no effect, no interval."""
    return {"finding": finding, "status": status, "measured": measured, "effect": "", "95% CI": "", "test": test,
            "seeds": str(seeds)}


def compare(finding: str, name_a: str, a: list[float], name_b: str, b: list[float], expect: str,
            what: str, margin: float | None = None) -> dict[str, str]:
    """The verdict on "``name_a`` has a ``expect`` (lower / higher / similar within ``margin``) ``what``
    than ``name_b``", paired by seed: ``a[s]`` and ``b[s]`` share seed s, hence their initial weights
    and data order, and the test runs on the differences ``a[s] - b[s]``."""
    if len(a) != len(b):
        raise ValueError(f"{finding}: {name_a} has {len(a)} seeds and {name_b} {len(b)}; a paired test needs the "
                         "same seeds for both")
    diffs = [x - y for x, y in zip(a, b)]
    measured = f"{what} {name_a} {_fmt(a)} vs {name_b} {_fmt(b)}"
    if expect != "similar":
        wins = sum(d < 0 if expect == "lower" else d > 0 for d in diffs)
        measured += f" ({name_a} {expect} in {wins} of {len(diffs)} paired seeds)"
    return verdict(finding, diffs, expect, measured, TOST if expect == "similar" else PAIRED_T, margin)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed; nan from a diverged run, not an error)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int = 4) -> str:
    mean, std = spread(values)
    return f"{mean:.{digits}g} ± {std:.2g}"


def _tail(rows: Rows, key: str, layer: int | None = None) -> float:
    """Mean of ``key`` over the last tenth of the steps (of one layer, or of all layers)."""
    points = [row[key] for row in rows if key in row and "loss" in row]
    tail = points[-max(1, round(len(points) * TAIL)):]
    if isinstance(tail[0], list):
        tail = [p[layer] if layer is not None else statistics.fmean(p) for p in tail]
    return statistics.fmean(tail)


def _final_loss(rows: Rows) -> float:
    return _tail(rows, "loss")


def _final_val(rows: Rows) -> float:
    last = next(row["val_loss"] for row in reversed(rows) if "val_loss" in row)
    return statistics.fmean(last.values())


def _per_seed(runs: Histories, variant: str, measure: Callable[[Rows], float]) -> list[float]:
    return [measure(rows) for rows in runs[variant]]


# ----------------------------------------------------------------------------------- ablations
# Equivalence margin of the "similar loss" findings, in nats of final (train or validation) loss: a
# difference smaller than this is "similar". Stated in each finding; change it here.
LOSS_MARGIN = 0.02
# The upcycled variant each budget's rule-of-thumb finding compares with scratch, chosen before the runs:
# the report's recommended practice - upcycle the dense model you have (its final checkpoint, whose cost
# is C_dense) with a tuned, decaying learning rate ("3xLR"), not the constant min lr it found too small.
INIT_COMPARED = "upcycle-final-3xlr"
# Adaptive alpha counts as having acted only if its mean over the run is below this share of alpha_max
# in some layer of some seed; otherwise the adaptive arm was a fixed alpha_max arm.
ACTED = 0.95


def _gating_norm(plan: AblationPlan, runs: Histories, records: dict) -> tuple[list, list, dict, list]:
    layer = _middle_layer(runs)
    table = []
    for v in plan.variants:
        table.append({"variant": v.name, "seeds": len(runs[v.name]),
                      "final train loss": _fmt(_per_seed(runs, v.name, lambda r: _tail(r, "loss"))),
                      "final validation loss": _fmt(_per_seed(runs, v.name, _final_val)),
                      "drop rate": _fmt(_per_seed(runs, v.name, lambda r: _tail(r, "drop_rate")), 3),
                      f"Max1/Max2 (layer {layer})": _fmt(_per_seed(runs, v.name,
                                                                   lambda r: _tail(r, "max1_max2", layer)), 3),
                      f"Max2/Max3 (layer {layer})": _fmt(_per_seed(runs, v.name,
                                                                   lambda r: _tail(r, "max2_max3", layer)), 3)})
    base, norm = "no-norm", "lambda=1"
    loss = _final_loss
    findings = [
        compare("normalization lowers the training loss", norm, _per_seed(runs, norm, loss), base,
                _per_seed(runs, base, loss), "lower", "final train loss"),
        compare("normalization lowers the token drop rate", norm, _per_seed(runs, norm, lambda r: _tail(r, "drop_rate")),
                base, _per_seed(runs, base, lambda r: _tail(r, "drop_rate")), "lower", "drop rate"),
        compare("normalization keeps Max1/Max2 well above the plain gate's", norm,
                _per_seed(runs, norm, lambda r: _tail(r, "max1_max2", layer)), base,
                _per_seed(runs, base, lambda r: _tail(r, "max1_max2", layer)), "higher", f"Max1/Max2 (layer {layer})"),
        compare("normalization keeps Max2/Max3 well above the plain gate's", norm,
                _per_seed(runs, norm, lambda r: _tail(r, "max2_max3", layer)), base,
                _per_seed(runs, base, lambda r: _tail(r, "max2_max3", layer)), "higher", f"Max2/Max3 (layer {layer})"),
        compare("lambda = 1 and lambda = 2 give similar loss", "lambda=2", _per_seed(runs, "lambda=2", loss), norm,
                _per_seed(runs, norm, loss), "similar", "final train loss", margin=LOSS_MARGIN),
    ]
    names = [v.name for v in plan.variants]
    plots = {
        "figure3-training.png": _panels(runs, names, [
            ("loss", None, "training loss"), ("drop_rate", None, "token drop rate (mean over MoE layers)"),
            ("max1_max2", layer, f"gate Max1/Max2, MoE layer {layer}"),
            ("max2_max3", layer, f"gate Max2/Max3, MoE layer {layer}")]),
        "figure2-gate-distribution.png": _gate_distribution(plan, records, layer),
    }
    notes = [f"Gate distribution: final weights of every seed on {SEQUENCES} validation sequences, MoE layer {layer}."]
    return table, findings, plots, notes


def _aux_coef(plan: AblationPlan, runs: Histories, records: dict) -> tuple[list, list, dict, list]:
    table = [{"variant": v.name, "seeds": len(runs[v.name]),
              "final train loss": _fmt(_per_seed(runs, v.name, lambda r: _tail(r, "loss"))),
              "final validation loss": _fmt(_per_seed(runs, v.name, _final_val)),
              "mean drop rate": _fmt(_per_seed(runs, v.name, lambda r: _mean(r, "drop_rate")), 3),
              "final drop rate": _fmt(_per_seed(runs, v.name, lambda r: _tail(r, "drop_rate")), 3),
              "mean alpha": _fmt(_per_seed(runs, v.name, lambda r: _mean(r, "alpha")), 3),
              "final alpha": _fmt(_per_seed(runs, v.name, lambda r: _tail(r, "alpha")), 3)}
             for v in plan.variants]
    loss = _final_loss

    def drops(rows: Rows) -> float:
        return _mean(rows, "drop_rate")

    aux = next(v for v in plan.variants if v.name == "adaptive").settings["aux_loss"]
    idle = _adaptive_idle(runs["adaptive"], aux)
    findings = [
        compare("adaptive alpha costs less loss than a fixed large alpha (1e-2)", "adaptive",
                _per_seed(runs, "adaptive", loss), "fixed-0.01", _per_seed(runs, "fixed-0.01", loss), "lower",
                "final train loss"),
        compare("adaptive alpha drops fewer tokens than a fixed small alpha (1e-3)", "adaptive",
                _per_seed(runs, "adaptive", drops), "fixed-0.001", _per_seed(runs, "fixed-0.001", drops), "lower",
                "mean drop rate"),
        _alpha_tracks_drops(runs["adaptive"]),
    ]
    if idle:  # the comparisons above were fixed alpha_max against a fixed alpha: they say nothing of the rule
        for finding in findings:
            finding["status"] = f"{NOT_DECIDED} ({idle})"
            finding["measured"] += "; the adaptive arm was in effect a fixed alpha_max arm"
    names = [v.name for v in plan.variants]
    layers = len(next(row["drop_rate"] for row in runs[names[0]][0] if "drop_rate" in row))
    plots = {
        "loss.png": _panels(runs, names, [("loss", None, "training loss")]),
        "drop-rate-per-layer.png": _panels(runs, names, [("drop_rate", i, f"drop rate, MoE layer {i}")
                                                         for i in range(layers)]),
        "alpha-per-layer.png": _panels(runs, names, [("alpha", i, f"alpha, MoE layer {i}") for i in range(layers)],
                                       smooth=False),
        "adaptive-alpha-against-drop-rate.png": _alpha_against_drops(runs["adaptive"], aux),
    }
    return table, findings, plots, []


def _init(plan: AblationPlan, runs: Histories, records: dict) -> tuple[list, list, dict, list]:
    table, findings, plots, notes = [], [], {}, []
    dense = next(v for v in plan.variants if not v.moe)
    for v in plan.variants:
        table.append({"run": v.name, "budget": v.group or "dense", "steps": v.phase.steps,
                      "tokens": v.phase.steps * plan.tokens_per_step, "peak lr": f"{v.phase.lr:.2g}"
                      + (" const" if v.phase.constant else ""), "seeds": len(runs[v.name]),
                      "final validation loss": _fmt(_per_seed(runs, v.name, _final_val)),
                      "final train loss": _fmt(_per_seed(runs, v.name, lambda r: _tail(r, "loss"))),
                      "final expert similarity": "" if not v.moe else
                      _fmt(_per_seed(runs, v.name, lambda r: _last(r, "expert_similarity")), 3)})
    groups = list(dict.fromkeys(v.group for v in plan.variants if v.group))
    expected = {groups[0]: "upcycled", groups[-1]: "scratch"}  # C_MoE << C_dense: upcycle; >= 2 C_dense: scratch
    moe_flops, dense_flops = plan.flops
    for group in groups:
        members = [v for v in plan.variants if v.group == group]
        scores = {v.name: _per_seed(runs, v.name, _final_val) for v in members}
        upcycled, scratch = f"{INIT_COMPARED}/{group}", f"scratch-decay/{group}"
        record = compare(f"budget {group}: {expected[group]} initialisation wins (the report's rule of thumb; "
                         f"pre-registered upcycled variant {INIT_COMPARED})", upcycled, scores[upcycled], scratch,
                         scores[scratch], "lower" if expected[group] == "upcycled" else "higher",
                         "final validation loss")
        winner = min(scores, key=lambda n: spread(scores[n])[0])
        record["measured"] = f"winner by mean {winner} (descriptive, not tested); " + record["measured"]
        findings.append(record)
        cost = members[0].phase.steps * moe_flops / (dense.phase.steps * dense_flops)
        notes.append(f"budget {group}: {members[0].phase.steps} MoE steps = {cost:.2f} x the dense run's training "
                     f"FLOPs ({dense.phase.steps} steps)")
        names = [v.name for v in members]
        plots[f"loss-{group}.png"] = _panels(runs, [dense.name] + names, [
            ("loss", None, f"training loss, budget {group}"), ("val", None, f"validation loss, budget {group}")])
        plots[f"figure1-expert-similarity-{group}.png"] = _panels(
            runs, names, [("expert_similarity", None, f"average expert similarity, budget {group}")], smooth=False)
    small = groups[0]
    score = {name: _per_seed(runs, f"{name}/{small}", _final_val)
             for name in ("scratch-decay", "upcycle-third-decay", "upcycle-final-const")}
    findings += [  # the report's 100B-token reading: scratch ~ from-100B, both beat from-300B at a constant small lr
        compare(f"budget {small}: scratch and upcycled-from-1/3 give similar loss", "scratch-decay",
                score["scratch-decay"], "upcycle-third-decay", score["upcycle-third-decay"], "similar",
                "final validation loss", margin=LOSS_MARGIN),
        compare(f"budget {small}: upcycled-from-1/3 beats upcycled-from-final at a constant small lr",
                "upcycle-third-decay", score["upcycle-third-decay"], "upcycle-final-const",
                score["upcycle-final-const"], "lower", "final validation loss"),
        compare(f"budget {small}: scratch beats upcycled-from-final at a constant small lr", "scratch-decay",
                score["scratch-decay"], "upcycle-final-const", score["upcycle-final-const"], "lower",
                "final validation loss"),
    ]
    for group in groups:
        upcycled = [v.name for v in plan.variants if v.group == group and v.init == "upcycle"]
        findings += [_similarity_falls(runs, group, upcycled), _similarity_finding(runs, group, upcycled)]
    return table, findings, plots, notes


def _similarity_falls(runs: Histories, group: str, upcycled: list[str]) -> dict[str, str]:
    """Figure 1: the expert similarity of upcycled models starts at 1 and falls. Per seed, the change
    from the first to the last measurement averaged over the budget's upcycled variants; tested
    against 0 over seeds."""
    first = {n: _per_seed(runs, n, lambda r: _first(r, "expert_similarity")) for n in upcycled}
    last = {n: _per_seed(runs, n, lambda r: _last(r, "expert_similarity")) for n in upcycled}
    change = [statistics.fmean(last[n][seed] - first[n][seed] for n in upcycled)
              for seed in range(len(first[upcycled[0]]))]
    starts = [value for n in upcycled for value in first[n]]
    measured = (f"first measurement {min(starts):.3f}-{max(starts):.3f} over variants and seeds; change to the "
                f"last, mean over {len(upcycled)} upcycled variants, {_fmt(change, 3)}")
    return verdict(f"budget {group}: the expert similarity of upcycled models starts at 1 and falls", change,
                   "lower", measured, ONE_SAMPLE_T)


def _similarity_finding(runs: Histories, group: str, upcycled: list[str]) -> dict[str, str]:
    """Figure 1's reading: among upcycled models of one budget, the one with the highest final expert
    similarity (by its mean over seeds) is the weakest. An intersection-union test: reproduced only if
    its validation loss is higher than every other upcycled model's by a paired t-test each; not
    reproduced if one of them is significantly weaker; the effect shown is against the closest one."""
    finding = f"budget {group}: the upcycled model with the highest expert similarity is the weakest"
    similarity = {n: statistics.fmean(_per_seed(runs, n, lambda r: _last(r, "expert_similarity"))) for n in upcycled}
    losses = {n: _per_seed(runs, n, _final_val) for n in upcycled}
    most = max(similarity, key=similarity.get)
    results = {other: compare(finding, most, losses[most], other, losses[other], "higher", "final validation loss")
               for other in upcycled if other != most}
    closest = min(results, key=lambda other: statistics.fmean(losses[most]) - statistics.fmean(losses[other]))
    record = results[closest]
    statuses = {r["status"] for r in results.values()}
    if NOT_REPRODUCED in statuses:
        record["status"] = NOT_REPRODUCED
    elif statuses != {REPRODUCED} and record["status"] == REPRODUCED:
        record["status"] = next(iter(statuses - {REPRODUCED}))
    record["measured"] = (f"highest final similarity {most} ({similarity[most]:.3f}); against the closest of the "
                          f"other upcycled models: " + record["measured"])
    record["test"] += f", against each of {len(results)} (intersection-union)"
    return record


def _adaptive_idle(runs: list[Rows], aux: dict[str, float]) -> str | None:
    """Why the adaptive arm says nothing about the adaptive rule, or None when the rule acted: with
    alpha at alpha_max all run long, in every layer and seed, "adaptive" was a fixed alpha_max run."""
    lowest = min(float(np.min(np.mean([row["alpha"] for row in rows if "alpha" in row], axis=0))) for rows in runs)
    if lowest < ACTED * aux["alpha_max"]:
        return None
    return (f"the rule never acted: alpha stayed at alpha_max = {aux['alpha_max']:g} in every layer and seed, "
            f"lowest run mean {lowest:.3g}")


def _alpha_tracks_drops(runs: list[Rows]) -> dict[str, str]:
    """Per-layer adaptive alpha follows per-layer drops: per seed, the Spearman correlation over layers of
    the run-mean drop rate and the run-mean alpha; tested against 0 over seeds. Seeds whose alpha is the
    same in every layer cannot order the layers and are left out."""
    finding = "adaptive alpha is layer-specific: the layers that drop more tokens hold larger alphas"
    correlations = []
    for rows in runs:
        drops = np.mean([row["drop_rate"] for row in rows if "drop_rate" in row], axis=0)
        alphas = np.mean([row["alpha"] for row in rows if "alpha" in row], axis=0)
        if np.ptp(alphas) > 0 and np.ptp(drops) > 0:
            correlations.append(float(scipy_stats.spearmanr(drops, alphas).statistic))
    measured = (f"Spearman correlation over layers of drop rate and alpha, {len(correlations)} of {len(runs)} seeds "
                "with alphas that differ between layers" + (f": {_fmt(correlations, 3)}" if correlations else ""))
    if len(runs) < 2:
        return undecided(finding, ONE_SEED, measured, ONE_SAMPLE_T, len(runs))
    if len(correlations) < 2:
        return undecided(finding, f"{NOT_DECIDED} (alpha equal in every layer in {len(runs) - len(correlations)} "
                         f"of {len(runs)} seeds)", measured, ONE_SAMPLE_T, len(correlations))
    return verdict(finding, correlations, "higher", measured, ONE_SAMPLE_T)


def _mean(rows: Rows, key: str) -> float:
    return float(np.mean([row[key] for row in rows if key in row]))


def _last(rows: Rows, key: str) -> float:
    return float(np.mean(next(row[key] for row in reversed(rows) if key in row)))


def _first(rows: Rows, key: str) -> float:
    return float(np.mean(next(row[key] for row in rows if key in row)))


def _middle_layer(runs: Histories) -> int:
    rows = next(iter(runs.values()))[0]
    return len(next(row["drop_rate"] for row in rows if "drop_rate" in row)) // 2


# ----------------------------------------------------------------------------------- plots
def _series(rows: Rows, key: str, layer: int | None) -> tuple[np.ndarray, np.ndarray]:
    if key == "val":
        points = [row for row in rows if "val_loss" in row]
        return (np.array([r["tokens"] for r in points]),
                np.array([statistics.fmean(r["val_loss"].values()) for r in points]))
    points = [row for row in rows if key in row and ("loss" in row or key != "loss")]
    values = [row[key] if not isinstance(row[key], list) else
              row[key][layer] if layer is not None else statistics.fmean(row[key]) for row in points]
    return np.array([r["tokens"] for r in points]), np.array(values, dtype=float)


def _panels(runs: Histories, names: list[str], panels: list[tuple[str, int | None, str]], smooth: bool = True) -> bytes:
    """One panel per (metric, layer, title): the mean over seeds against tokens, shaded from the seeds'
    minimum to maximum; noisy per-step metrics get a moving average (window: 5% of the steps)."""
    cols = min(2, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(6.5 * cols, 3.8 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (key, layer, title) in zip(axes.flat, panels):
        for index, name in enumerate(names):
            series = [_series(rows, key, layer) for rows in runs[name]]
            if not len(series[0][0]):
                continue
            length = min(len(s[1]) for s in series)
            x, ys = series[0][0][:length], np.stack([s[1][:length] for s in series])
            if smooth and key != "val" and length >= 20:
                ys = np.stack([_moving_average(y, max(1, length // 20)) for y in ys])
            ax.plot(x, ys.mean(0), color=f"C{index}", lw=1.3, label=name, marker="o" if key == "val" else None, ms=3)
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=f"C{index}", alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return figure_png(fig, dpi=90)


def _alpha_against_drops(runs: list[Rows], aux: dict[str, float]) -> bytes:
    """Each logged step of the adaptive arm as a point (the layer's drop rate, the alpha the step used),
    one colour per MoE layer, every seed, under the rule's target min(xi * d, alpha_max): points on the
    flat part are layers held at alpha_max, points below it layers whose alpha the rule relaxed."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = [row for seed in runs for row in seed if "alpha" in row and "drop_rate" in row]
    drops, alphas = np.array([r["drop_rate"] for r in rows]), np.array([r["alpha"] for r in rows])
    for layer in range(drops.shape[1]):
        ax.scatter(drops[:, layer], alphas[:, layer], s=6, color=f"C{layer}", alpha=0.5, label=f"MoE layer {layer}")
    target = np.linspace(0, max(float(drops.max()), 2 * aux["alpha_max"] / aux["xi"]), 100)
    ax.plot(target, np.minimum(aux["xi"] * target, aux["alpha_max"]), "k--", lw=1,
            label=f"target min({aux['xi']:g} d, {aux['alpha_max']:g})")
    ax.set_xlabel("drop rate of the layer at the step")
    ax.set_ylabel("alpha used at the step")
    ax.set_title(f"adaptive alpha against drop rate ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_png(fig, dpi=90)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def _gate_distribution(plan: AblationPlan, records: dict, layer: int) -> bytes:
    """Figure 2: the top-1 gate probability's density and the mean sorted gate vector, per variant
    (averaged over seeds), from the final weights on validation tokens."""
    fig, (hist_ax, sorted_ax) = plt.subplots(1, 2, figsize=(13, 4))
    for index, variant in enumerate(plan.variants):
        profiles = [records[(variant.name, seed)]["gates"][layer] for seed in range(plan.seeds)]
        hist = np.mean([p["top1_hist"] for p in profiles], axis=0)
        edges = np.linspace(0, 1, len(hist) + 1)
        hist_ax.stairs(hist, edges, color=f"C{index}", label=variant.name, lw=1.5)
        ranked = np.mean([p["sorted_mean"] for p in profiles], axis=0)
        sorted_ax.plot(np.arange(1, len(ranked) + 1), ranked, "o-", color=f"C{index}", label=variant.name)
    hist_ax.set_title(f"top-1 gate probability, MoE layer {layer} (density)")
    hist_ax.set_xlabel("largest gate value of a token")
    sorted_ax.set_title(f"mean gate value by rank, MoE layer {layer}")
    sorted_ax.set_xlabel("rank of the expert in the token's gate")
    for ax in (hist_ax, sorted_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure_png(fig, dpi=90)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)
