"""PNG plots of training runs from their ``metrics.jsonl`` rows: what a person checks first.

``run_plots`` draws one run's panels (loss and validation loss by language, learning rate, and
for MoE runs the per-layer aux loss, alpha, token drop rate, gate Max1/Max2 and Max2/Max3,
expert similarity, expert load, plus throughput and MFU: against the data-sheet peak where the run
had one, else against the measured matmul peak, labelled so); ``comparison_plot`` overlays the loss
curves of all runs of a stage against training tokens.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from skymoe.plots import figure_png  # noqa: E402

Rows = list[dict[str, Any]]

# (metric key, panel title, log scale) of the per-layer MoE series.
_LAYER_PANELS = (
    ("aux_loss", "aux loss per MoE layer", True),
    ("alpha", "aux-loss coefficient alpha", False),
    ("drop_rate", "token drop rate", False),
    ("max1_max2", "gate Max1/Max2", False),
    ("max2_max3", "gate Max2/Max3", False),
    ("expert_similarity", "average expert similarity", False),
)


def run_plots(name: str, rows: Rows) -> dict[str, bytes]:
    """``{file name: PNG}`` for one run."""
    moe = any("drop_rate" in row for row in rows)
    panels = 3 + (len(_LAYER_PANELS) if moe else 0)
    cols = 3
    fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(5 * cols, 3.2 * -(-panels // cols)), squeeze=False)
    flat = list(axes.flat)
    _loss_panel(flat[0], rows)
    _series(flat[1], rows, "lr", "learning rate")
    mfu = "mfu" if any(row.get("mfu") is not None for row in rows) else "mfu_vs_measured_matmul"
    _series(flat[2], rows, "tokens_per_s", f"tokens/s (left) and {mfu} (right, red)")
    _series(flat[2].twinx(), rows, mfu, None, color="tab:red")
    for ax, (key, title, log_scale) in zip(flat[3:], _LAYER_PANELS if moe else ()):
        _layer_series(ax, rows, key, title, log_scale)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"run {name}")
    out = {f"{name}-training.png": figure_png(fig)}
    if moe:
        out[f"{name}-expert-load.png"] = _expert_load(name, rows)
    return out


def comparison_plot(histories: dict[str, Rows]) -> bytes:
    """Training loss (solid) and mean validation loss (markers) of every run against tokens."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, (name, rows) in enumerate(histories.items()):
        color = f"C{index}"
        steps = [row for row in rows if "loss" in row]
        ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], color=color, label=f"{name} train", lw=1)
        val = [row for row in rows if "val_loss" in row]
        ax.plot([r["tokens"] for r in val], [sum(r["val_loss"].values()) / len(r["val_loss"]) for r in val],
                "o--", color=color, label=f"{name} validation", ms=4)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title("loss against training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _loss_panel(ax, rows: Rows) -> None:
    steps = [row for row in rows if "loss" in row]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train")
    domains = sorted({d for row in rows for d in row.get("val_loss", {})})
    for domain in domains:
        val = [row for row in rows if domain in row.get("val_loss", {})]
        ax.plot([r["step"] for r in val], [r["val_loss"][domain] for r in val], "o--", ms=3, label=f"val {domain}")
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _series(ax, rows: Rows, key: str, title: str | None, color: str = "tab:blue") -> None:
    points = [row for row in rows if row.get(key) is not None]
    ax.plot([r["step"] for r in points], [r[key] for r in points], lw=1, color=color)
    if title:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)


def _layer_series(ax, rows: Rows, key: str, title: str, log_scale: bool) -> None:
    points = [row for row in rows if key in row]
    if points:
        for layer in range(len(points[0][key])):
            ax.plot([r["step"] for r in points], [r[key][layer] for r in points], lw=1, marker=".", ms=3,
                    label=f"layer {layer}")
        ax.legend(fontsize=6)
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _expert_load(name: str, rows: Rows) -> bytes:
    """Share of routed tokens per expert and MoE layer, averaged over the run's last tenth."""
    points = [row["expert_load"] for row in rows if "expert_load" in row]
    tail = points[-max(1, len(points) // 10):]
    layers, experts = len(tail[0]), len(tail[0][0])
    load = [[sum(p[layer][e] for p in tail) / len(tail) for e in range(experts)] for layer in range(layers)]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * experts, 1 + 0.5 * layers))
    image = ax.imshow(load, cmap="viridis", aspect="auto")
    for layer in range(layers):
        for e in range(experts):
            ax.text(e, layer, f"{load[layer][e]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{name}: expert load (uniform = {1 / experts:.3f})")
    fig.colorbar(image, ax=ax)
    return figure_png(fig)
