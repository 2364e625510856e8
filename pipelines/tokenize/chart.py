"""The stage's mixture chart, drawn with Pillow: a horizontal bar chart as PNG bytes.

Not ``skymoe.plots.bar_chart_png``: importing matplotlib costs about 0.6 s per process and drawing
one figure 0.15 s more, which was as long as encoding the whole 1x benchmark corpus (3 MB of text);
Pillow (a matplotlib dependency, so always installed) draws the same few bars in a few
milliseconds. The chart is for people: it is not part of the stage's code version.
"""

from __future__ import annotations

import io
import math

WIDTH = 880
BAR, GAP, PAD = 18, 8, 14
BAR_COLOR, TEXT_COLOR, AXIS_COLOR, GRID_COLOR = "#4C72B0", "#222222", "#555555", "#E5E5E5"


def bar_chart_png(title: str, values: dict[str, float], xlabel: str) -> bytes:
    """Bars for ``values``, largest on top, each labelled with its value; ``xlabel`` under the axis."""
    from PIL import Image, ImageDraw

    font, title_font = _font(12), _font(15)
    items = sorted(values.items(), key=lambda kv: kv[1], reverse=True)
    top = max(values.values(), default=0.0)
    ticks = _ticks(top)
    span = ticks[-1] or 1.0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((measure.textlength(label, font=font) for label, _ in items), default=0.0)
    value_w = max((measure.textlength(f" {value:,.0f}", font=font) for _, value in items), default=0.0)
    left, right = PAD + int(label_w) + 8, WIDTH - PAD - int(value_w) - 4
    title_h, axis_h = 34, 44
    height = title_h + len(items) * (BAR + GAP) + GAP + axis_h
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (WIDTH / 2, PAD), title, title_font, "m", "t")
    bottom = title_h + len(items) * (BAR + GAP) + GAP

    def x_of(value: float) -> float:
        return left + (right - left) * value / span

    for tick in ticks:
        x = x_of(tick)
        draw.line([(x, title_h), (x, bottom)], fill=GRID_COLOR)
        draw.line([(x, bottom), (x, bottom + 4)], fill=AXIS_COLOR)
        _text(draw, (x, bottom + 6), f"{tick:,.0f}", font, "m", "t")
    for row, (label, value) in enumerate(items):
        y = title_h + GAP + row * (BAR + GAP)
        draw.rectangle([left, y, max(x_of(value), left + 1), y + BAR], fill=BAR_COLOR)
        _text(draw, (left - 6, y + BAR / 2), label, font, "r", "m")
        _text(draw, (x_of(value), y + BAR / 2), f" {value:,.0f}", font, "l", "m")
    draw.line([(left, title_h), (left, bottom), (right, bottom)], fill=AXIS_COLOR)
    _text(draw, ((left + right) / 2, bottom + 24), xlabel, font, "m", "t")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _text(draw, xy: tuple[float, float], text: str, font, across: str, down: str) -> None:
    """``text`` placed by its box: ``across`` l/m/r and ``down`` t/m of the box at ``xy`` (by hand, not
    Pillow's ``anchor``, which its bitmap fallback font does not support)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[across]
    y = xy[1] - {"t": 0, "m": (y1 - y0) / 2}[down]
    draw.text((x - x0, y - y0), text, fill=TEXT_COLOR, font=font)


def _ticks(top: float) -> list[float]:
    """Round axis ticks from 0 past ``top``: steps of 1, 2, 2.5 or 5 times a power of ten, at most 6 steps."""
    if top <= 0:
        return [0.0, 1.0]
    rough = top / 5
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(power * m for m in (1, 2, 2.5, 5, 10) if power * m >= rough)
    return [step * i for i in range(math.ceil(top / step) + 1)]


def _font(size: int):
    """Pillow's bundled font at ``size`` (FreeType), or its small bitmap font where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()
