"""Tables, plots, verdicts and the markdown report of one ablation, from its runs' ``metrics.jsonl``.

Numbers are per variant over seeds: the mean and the sample standard deviation ("spread"). A
finding counts as reproduced only when the difference it predicts has the report's sign and is
larger than the two variants' spreads added together; otherwise it is "inconclusive (within seed
spread)", or "not reproduced" when the difference is clear and has the opposite sign.
"""

from __future__ import annotations

import base64
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np

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
    out: Histories = {}
    for run in plan.runs:
        text = storage.read_text(join(run.uri, "metrics.jsonl"))
        out.setdefault(run.variant.name, []).append([json.loads(line) for line in text.splitlines()])
    return out


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
    method = ("Mean and spread (sample standard deviation) over seeds; final training numbers are means over "
              f"the last {TAIL:.0%} of the steps; validation loss is the mean over languages and sources at the end.")
    lines = [f"# {title}", "", setup, "", budgets, "", method, "", "## Results", "", _markdown_table(table), "",
             "## Findings", ""]
    lines += [f"- **{f['status']}** - {f['finding']}: {f['measured']}" for f in findings]
    lines += [f"- {note}" for note in notes]
    lines += ["", "## Plots", ""] + [f"![{name}](plots/{name})" for name in plots]
    return Report(title, "\n".join(lines) + "\n", plots, table, findings)


def write_report(storage: Storage, plan: AblationPlan, report: Report) -> str:
    """``report.md`` and ``plots/*.png`` under the ablation's report folder; its URI."""
    for name, png in report.plots.items():
        storage.write_bytes(join(plan.report_uri, "plots", name), png)
    storage.write_text(join(plan.report_uri, "report.md"), report.markdown)
    storage.write_text(join(plan.report_uri, "summary.json"), json.dumps(
        {"table": report.table, "findings": report.findings}, indent=1))
    return plan.report_uri


# ----------------------------------------------------------------------------------- statistics
def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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


def compare(finding: str, name_a: str, a: list[float], name_b: str, b: list[float], expect: str,
            what: str) -> dict[str, str]:
    """A verdict on "``name_a`` has a ``expect`` (lower / higher / similar) ``what`` than ``name_b``".

    Seed s of every variant shares its data order and non-gate initial weights, so the measured
    line also counts the seeds in which the pair differs in the expected direction (paired)."""
    (mean_a, std_a), (mean_b, std_b) = spread(a), spread(b)
    diff = mean_a - mean_b
    within = abs(diff) <= std_a + std_b
    if expect == "similar":
        status = "reproduced" if within else "not reproduced at this scale"
    elif within:
        status = "inconclusive (differences within seed spread)"
    else:
        status = "reproduced" if (diff < 0) == (expect == "lower") else "not reproduced at this scale"
    paired = sum((x < y) if expect != "higher" else (x > y) for x, y in zip(a, b))
    direction = "higher" if expect == "higher" else "lower"
    measured = (f"{what} {name_a} {mean_a:.4g} ± {std_a:.2g} vs {name_b} {mean_b:.4g} ± {std_b:.2g} "
                f"(difference {diff:+.3g}; {name_a} {direction} in {paired} of {len(a)} paired seeds)")
    return {"finding": finding, "status": status, "measured": measured}


# ----------------------------------------------------------------------------------- ablations
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
                _per_seed(runs, norm, loss), "similar", "final train loss"),
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

    findings = [
        compare("adaptive alpha costs less loss than a fixed large alpha (1e-2)", "adaptive",
                _per_seed(runs, "adaptive", loss), "fixed-0.01", _per_seed(runs, "fixed-0.01", loss), "lower",
                "final train loss"),
        compare("adaptive alpha drops fewer tokens than a fixed small alpha (1e-3)", "adaptive",
                _per_seed(runs, "adaptive", drops), "fixed-0.001", _per_seed(runs, "fixed-0.001", drops), "lower",
                "mean drop rate"),
        _alpha_tracks_drops(runs["adaptive"], next(v for v in plan.variants if v.name == "adaptive")
                            .settings["aux_loss"]),
    ]
    names = [v.name for v in plan.variants]
    layers = len(next(row["drop_rate"] for row in runs[names[0]][0] if "drop_rate" in row))
    plots = {
        "loss.png": _panels(runs, names, [("loss", None, "training loss")]),
        "drop-rate-per-layer.png": _panels(runs, names, [("drop_rate", i, f"drop rate, MoE layer {i}")
                                                         for i in range(layers)]),
        "alpha-per-layer.png": _panels(runs, names, [("alpha", i, f"alpha, MoE layer {i}") for i in range(layers)],
                                       smooth=False),
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
        best_up = min((v.name for v in members if v.init == "upcycle"), key=lambda n: spread(scores[n])[0])
        scratch = next(v.name for v in members if v.init == "random")
        verdict = compare(f"budget {group}: {expected[group]} initialisation wins (the report's rule of thumb)",
                          best_up, scores[best_up], scratch, scores[scratch],
                          "lower" if expected[group] == "upcycled" else "higher", "final validation loss")
        winner = min(scores, key=lambda n: spread(scores[n])[0])
        verdict["measured"] = f"winner {winner}; " + verdict["measured"]
        findings.append(verdict)
        cost = members[0].phase.steps * moe_flops / (dense.phase.steps * dense_flops)
        notes.append(f"budget {group}: {members[0].phase.steps} MoE steps = {cost:.2f} x the dense run's training "
                     f"FLOPs ({dense.phase.steps} steps)")
        names = [v.name for v in members]
        plots[f"loss-{group}.png"] = _panels(runs, [dense.name] + names, [
            ("loss", None, f"training loss, budget {group}"), ("val", None, f"validation loss, budget {group}")])
        plots[f"figure1-expert-similarity-{group}.png"] = _panels(
            runs, names, [("expert_similarity", None, f"average expert similarity, budget {group}")], smooth=False)
    for group in groups:
        findings.append(_similarity_finding(runs, group, [v.name for v in plan.variants
                                                          if v.group == group and v.init == "upcycle"]))
    return table, findings, plots, notes


def _similarity_finding(runs: Histories, group: str, upcycled: list[str]) -> dict[str, str]:
    """Figure 1's reading: among upcycled models of one budget, the highest final expert similarity
    goes with the weakest model (highest final validation loss), clearly weaker than the best one."""
    similarity = {n: spread(_per_seed(runs, n, lambda r: _last(r, "expert_similarity")))[0] for n in upcycled}
    losses = {n: _per_seed(runs, n, _final_val) for n in upcycled}
    most_similar = max(similarity, key=similarity.get)
    weakest = max(losses, key=lambda n: spread(losses[n])[0])
    best = min(losses, key=lambda n: spread(losses[n])[0])
    (weak_mean, weak_std), (best_mean, best_std) = spread(losses[weakest]), spread(losses[best])
    if weak_mean - best_mean <= weak_std + best_std:
        status = "inconclusive (differences within seed spread)"
    else:
        status = "reproduced" if most_similar == weakest else "not reproduced at this scale"
    return {"finding": f"budget {group}: the upcycled model with the highest expert similarity is the weakest",
            "status": status,
            "measured": f"highest final similarity {most_similar} ({similarity[most_similar]:.3f}); validation loss "
                        f"weakest {weakest} {weak_mean:.4g} ± {weak_std:.2g}, best {best} {best_mean:.4g} ± "
                        f"{best_std:.2g}"}


def _alpha_tracks_drops(runs: list[Rows], aux: dict[str, float]) -> dict[str, str]:
    """Per-layer adaptive alpha follows per-layer drops: the layer dropping most holds the largest alpha.
    Untestable while every layer drops more than alpha_max / xi: alpha then sits at alpha_max everywhere."""
    finding = "adaptive alpha is layer-specific: the layer that drops most tokens holds the largest alpha"
    finals = [np.array([row["alpha"] for row in rows if "alpha" in row][-1]) for rows in runs]
    if all(final.min() >= 0.99 * aux["alpha_max"] for final in finals):
        return {"finding": finding, "status": "inconclusive (differences within seed spread)",
                "measured": f"alpha ends at alpha_max = {aux['alpha_max']:g} in every layer and seed: every layer "
                            f"drops more than alpha_max / xi = {aux['alpha_max'] / aux['xi']:.0%} of its routes, "
                            "so the rule cannot tell the layers apart"}
    agree = []
    for rows, final in zip(runs, finals):
        drops = np.mean([row["drop_rate"] for row in rows if "drop_rate" in row], axis=0)
        agree.append(int(np.argmax(drops) == np.argmax(final)))
    return {"finding": finding,
            "status": "reproduced" if all(agree) else "not reproduced at this scale" if not any(agree)
            else "inconclusive (differences within seed spread)",
            "measured": f"{sum(agree)} of {len(agree)} seeds"}


def _mean(rows: Rows, key: str) -> float:
    return float(np.mean([row[key] for row in rows if key in row]))


def _last(rows: Rows, key: str) -> float:
    return float(np.mean(next(row[key] for row in reversed(rows) if key in row)))


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
