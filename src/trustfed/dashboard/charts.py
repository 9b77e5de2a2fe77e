"""Chart geometry for the dashboard's inline SVG: plain numbers and labels, computed here and drawn by
the templates (which escape every label). No chart library, nothing fetched by the browser."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT, PAD = 420, 200, 32


@dataclass(frozen=True)
class LineChart:
    """One series per round: ``points`` as an SVG polyline, its axis labels and the last value."""

    title: str
    points: str
    dots: tuple[tuple[float, float, str], ...]  # x, y, the value at that round (for the tooltip)
    top: str
    bottom: str
    first: int
    last: int
    latest: str
    width: int = WIDTH
    height: int = HEIGHT
    pad: int = PAD


@dataclass(frozen=True)
class Bar:
    label: str
    y: float
    length: float  # the epsilon spent, in pixels
    budget_x: float | None  # where the party's budget ends, in pixels from the axis (None: no budget)
    value: str


@dataclass(frozen=True)
class BarChart:
    title: str
    bars: tuple[Bar, ...]
    scale: str  # the value at the right end of the axis
    width: int
    height: int
    left: int = 70  # room for the labels
    bar_height: int = 18


def line_chart(rounds: Sequence[dict[str, Any]], key: str, title: str, unit_range: bool) -> LineChart | None:
    """``key`` (accuracy or loss) per round; ``unit_range``: the axis is 0..1, else 0..the largest value.
    None when no round has a finite value."""
    pts = [(int(r["round"]), float(r[key])) for r in rounds if isinstance(r.get(key), float)]
    if not pts:
        return None
    top = 1.0 if unit_range else max(max(v for _, v in pts), 1e-12)
    first, last = min(p[0] for p in pts), max(p[0] for p in pts)
    span = max(last - first, 1)

    def xy(rnd: int, v: float) -> tuple[float, float]:
        x = PAD + (rnd - first) / span * (WIDTH - 2 * PAD)
        y = HEIGHT - PAD - max(0.0, min(1.0, v / top)) * (HEIGHT - 2 * PAD)
        return round(x, 1), round(y, 1)

    coords = [(*xy(r, v), f"round {r}: {v:.4f}") for r, v in pts]
    return LineChart(
        title,
        " ".join(f"{x},{y}" for x, y, _ in coords),
        tuple(coords),
        f"{top:.4g}",
        "0",
        first,
        last,
        f"{pts[-1][1]:.4f}",
    )


def privacy_chart(privacy: Sequence[dict[str, Any]], width: int = 520) -> BarChart | None:
    """Epsilon spent per party as horizontal bars, with each party's budget marked. None without spend."""
    rows = [p for p in privacy if isinstance(p.get("epsilon"), float)]
    if not rows:
        return None
    budgets = [float(p["budget"]) for p in rows if isinstance(p.get("budget"), float)]
    top = max([float(p["epsilon"]) for p in rows] + budgets + [1e-12])
    left, step, bar_h = 70, 26, 18
    room = width - left - 70  # and room for the value at the end of each bar
    bars = tuple(
        Bar(
            str(p["party"]),
            8 + i * step,
            round(float(p["epsilon"]) / top * room, 1),
            round(float(p["budget"]) / top * room, 1) if isinstance(p.get("budget"), float) else None,
            f"{float(p['epsilon']):.2f}"
            + (f" / {float(p['budget']):.2f}" if isinstance(p.get("budget"), float) else ""),
        )
        for i, p in enumerate(rows)
    )
    return BarChart("epsilon spent per party", bars, f"{top:.2f}", width, 16 + len(rows) * step + 16, left, bar_h)
