"""Line charts as inline SVG markup: no plotting library, no scripts, nothing fetched when the page opens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

# matplotlib's tab10, so PNGs and the HTML report colour runs alike.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class Series:
    """One line: a name for the legend, x and y values, and how to draw it."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: str = PALETTE[0]
    dashed: bool = False
    markers: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.floor(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels in one style per axis: plain numbers, or powers of ten for very small or large ones (2e-4)."""
    top = max((abs(t) for t in ticks), default=0.0)
    if top and (top < 1e-2 or top >= 1e5):
        return ["0" if t == 0 else f"{t:.1e}".replace(".0e", "e").replace("e-0", "e-").replace("e+0", "e")
                for t in ticks]
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:]) if b != a), default=1.0)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))  # as many as the tick spacing needs, no more
    return [f"{t:.{decimals}f}" for t in ticks]


def line_chart(series: Sequence[Series], *, title: str, chart_id: str, x_label: str = "step", y_label: str = "",
               width: int = 370, height: int = 250) -> str:
    """An SVG line chart with axes, round ticks and a legend; data-chart and data-points attributes for tests."""
    drawn = [s for s in series if len(s.xs)]
    left, right, top, bottom = 58, 12, 28, 40
    legend_h = 16 * len(drawn) if len(drawn) > 1 else 0
    h = height + legend_h
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg class="chart" data-chart="{escape(chart_id)}" width="{width}" '
           f'height="{h}" viewBox="0 0 {width} {h}" role="img" aria-label="{escape(title)}">',
           f'<text class="title" x="{left}" y="17">{escape(title)}</text>']
    if not drawn:
        out.append(f'<text class="empty" x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(out)
    xs = [x for s in drawn for x in s.xs]
    ys = [y for s in drawn for y in s.ys if math.isfinite(y)]
    xt = nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    yt = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    for t, label in zip(yt, tick_labels(yt)):
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                   f'<text class="tick" x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>')
    for t, label in zip(xt, tick_labels(xt)):
        out.append(f'<text class="tick" x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>')
    out.append(f'<text class="axis" x="{left + pw / 2}" y="{top + ph + 33}" text-anchor="middle">{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text class="axis" transform="translate(13,{top + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{escape(y_label)}</text>')
    for s in drawn:
        pts = [(px(x), py(y)) for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        out.append(f'<polyline class="series" data-series="{escape(s.name)}" data-points="{len(pts)}" fill="none" '
                   f'stroke="{s.colour}" stroke-width="1.8"{dash} points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        if s.markers or len(pts) == 1:
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{s.colour}"/>' for x, y in pts)
    if legend_h:
        for i, s in enumerate(drawn):
            y = height + 16 * i + 4
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            out.append(f'<line x1="{left}" x2="{left + 22}" y1="{y}" y2="{y}" stroke="{s.colour}" stroke-width="2"{dash}/>'
                       f'<text class="legend" x="{left + 28}" y="{y + 4}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)
