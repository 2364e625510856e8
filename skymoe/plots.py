"""PNG plots of stage results, for people: written next to a stage's outputs and shown in Prefect."""

from __future__ import annotations

import io


def bar_chart_png(title: str, values: dict[str, float], xlabel: str) -> bytes:
    """A horizontal bar chart, largest bar on top, as PNG bytes (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.3 * max(len(items), 4) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4C72B0")
    for y, (_, v) in enumerate(items):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)
    return figure_png(fig, dpi=110)


def figure_png(fig, dpi: int = 100) -> bytes:
    """A finished matplotlib figure as PNG bytes; the figure is closed (plots are made in loops)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
