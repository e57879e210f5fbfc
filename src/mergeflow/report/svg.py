"""Inline SVG charts with no plotting dependency: bars, scatter with a Pareto front, heatmap, lines.

Every builder returns one self-contained ``<svg>`` string (``viewBox`` sized, scales with its
container) with a title, axis labels, a legend where there are series, and a ``<title>`` tooltip
on every mark. Colours come from :class:`Palette` so a method has the same colour in every chart.
Nothing here reads files or knows about mergeflow's metrics: callers pass plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
INK = "#1f2933"
MUTED = "#616e7c"
GRID = "#e4e7eb"

# Colour-blind-safe categorical colours (Tableau 10 order, then a few extra distinct hues).
CATEGORICAL = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#17becf",
    "#8c564b",
    "#bcbd22",
)
# Fixed colours for the rows every run has, so they never change between reports.
FIXED = {"expert": "#3b3b3b", "base": "#a5acb5"}


class Palette:
    """Stable name → colour: fixed colours for reference rows, then categorical in first-seen order.

    Args:
        names: Names to assign first (in this order), e.g. every row of ``metrics/eval.json``.
    """

    def __init__(self, names: Sequence[str] = ()):
        self._colors: dict[str, str] = {}
        for n in names:
            self(n)

    def __call__(self, name: str) -> str:
        """The colour of ``name`` (assigned on first use)."""
        if name not in self._colors:
            if name in FIXED:
                self._colors[name] = FIXED[name]
            else:
                used = sum(1 for k in self._colors if k not in FIXED)
                self._colors[name] = CATEGORICAL[used % len(CATEGORICAL)]
        return self._colors[name]

    def mapping(self) -> dict[str, str]:
        """Every name assigned so far → its colour."""
        return dict(self._colors)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k).

    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, v = [], start
    while v < hi - 1e-9 * step:
        ticks.append(v)
        v += step
    ticks.append(v)
    digits = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if step / mag == 2.5 else 0))
    return [round(t, digits + 2) for t in ticks]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks at 1, 2, 5 × 10^k covering [lo, hi] (both > 0), for a log axis."""
    if lo <= 0 or hi <= 0:
        raise ValueError("a log axis needs positive values")
    out = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10**k
            if lo / 1.0001 <= v <= hi * 1.0001:
                out.append(float(v))
    return out or [lo, hi]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (x smaller is better, y larger is better).

    A point dominates another if it is no worse in both and strictly better in one. Returned in
    increasing x, so joining them draws the front as a staircase.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def fmt_num(v: float, digits: int = 3) -> str:
    """A short human number: 0.812, 12.5, 1,250."""
    if v is None or not math.isfinite(v):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _tick_label(v: float) -> str:
    s = f"{v:.6g}"
    return s if "e" not in s else f"{v:.2g}"


def _text_width(s: str, size: float = 12) -> float:
    return len(s) * size * 0.58


@dataclass(frozen=True)
class _Frame:
    """Plot area inside the SVG (pixels)."""

    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height


def _svg(width: float, height: float, title: str, body: list[str], kind: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{kind}" role="img" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'font-family="{escape(FONT)}">'
        f"<title>{escape(title)}</title>"
        f'<rect width="100%" height="100%" fill="#ffffff"/>'
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="15" font-weight="600" '
        f'fill="{INK}">{escape(title)}</text>' + "".join(body) + "</svg>"
    )


def _legend(items: Sequence[tuple[str, str]], x0: float, y0: float, width: float,
            marker: str = "rect") -> tuple[list[str], float]:
    """Legend swatches laid out in wrapping rows; returns (elements, height used)."""
    out, x, y = ['<g class="legend">'], x0, y0
    for label, color in items:
        w = 18 + _text_width(label) + 14
        if x + w > x0 + width and x > x0:
            x, y = x0, y + 18
        if marker == "line":
            out.append(
                f'<line x1="{x:.1f}" y1="{y + 6:.1f}" x2="{x + 12:.1f}" y2="{y + 6:.1f}" '
                f'stroke="{color}" stroke-width="2.5"/>'
            )
        else:
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="12" height="12" rx="2" fill="{color}"/>')
        out.append(
            f'<text x="{x + 17:.1f}" y="{y + 10.5:.1f}" font-size="12" fill="{INK}">'
            f"{escape(label)}</text>"
        )
        x += w
    out.append("</g>")
    return out, (y - y0) + 18


def _axis_labels(f: _Frame, x_label: str, y_label: str, x_pad: float = 34) -> list[str]:
    out = []
    if x_label:
        out.append(
            f'<text class="x-label" x="{f.left + f.width / 2:.1f}" y="{f.bottom + x_pad:.1f}" '
            f'text-anchor="middle" font-size="12" fill="{MUTED}">{escape(x_label)}</text>'
        )
    if y_label:
        cx, cy = f.left - 48, f.top + f.height / 2
        out.append(
            f'<text class="y-label" x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" font-size="12" '
            f'fill="{MUTED}" transform="rotate(-90 {cx:.1f} {cy:.1f})">{escape(y_label)}</text>'
        )
    return out


def _value_axis_y(f: _Frame, ticks: Sequence[float], to_y: Callable[[float], float]) -> list[str]:
    out = []
    for t in ticks:
        y = to_y(t)
        out.append(
            f'<line x1="{f.left:.1f}" y1="{y:.1f}" x2="{f.right:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            f'<text x="{f.left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="{MUTED}">{_tick_label(t)}</text>'
        )
    return out


def _value_axis_x(f: _Frame, ticks: Sequence[float], to_x: Callable[[float], float],
                  label: Callable[[float], str] = _tick_label) -> list[str]:
    out = []
    for t in ticks:
        x = to_x(t)
        out.append(
            f'<line x1="{x:.1f}" y1="{f.top:.1f}" x2="{x:.1f}" y2="{f.bottom:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{f.bottom + 16:.1f}" text-anchor="middle" font-size="11" '
            f'fill="{MUTED}">{escape(label(t))}</text>'
        )
    return out


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _range(values: Sequence[float], lo: float | None, hi: float | None) -> tuple[float, float]:
    vals = _finite(values)
    if not vals and (lo is None or hi is None):
        return (0.0, 1.0)
    a = min(vals) if lo is None else lo
    b = max(vals) if hi is None else hi
    if b > a:
        return (a, b)
    pad = abs(a) * 0.05 or 0.5  # one value (or all equal): a narrow window around it
    return (a - pad, b + pad)


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    colors: Mapping[str, str] | Callable[[str], str],
    x_label: str = "",
    y_label: str = "",
    value_range: tuple[float | None, float | None] = (0.0, None),
    color_by: str = "series",
    reference: float | None = None,
    reference_label: str = "",
    width: float = 720,
    plot_height: float = 260,
) -> str:
    """Vertical grouped bars: one group per category, one bar per series, a value label on each.

    Args:
        title: Chart title.
        categories: Labels along the x axis.
        series: Series name → one value per category (``None``/NaN: no bar, marked "n/a").
        colors: Name → colour (a mapping or a :class:`Palette`).
        x_label: X axis label (what the categories are).
        y_label: Y axis label with unit.
        value_range: (min, max) of the value axis; ``None`` = from the data.
        color_by: ``series`` (legend of series) or ``category`` (a single series whose bars take
            their category's colour; no legend).
        reference: Draw a dashed horizontal line at this value (e.g. 1.0 = expert level).
        reference_label: Its label.
        width: SVG width in pixels.
        plot_height: Height of the plot area.
    """
    color = colors if callable(colors) else (lambda n: colors.get(n, CATEGORICAL[0]))
    names = list(series)
    for n in names:
        if len(series[n]) != len(categories):
            raise ValueError(f"series {n!r} has {len(series[n])} values for {len(categories)} categories")
    all_vals = [v for n in names for v in series[n]] + ([reference] if reference is not None else [])
    lo, hi = _range(all_vals, *value_range)
    ticks = nice_ticks(lo, hi)
    lo, hi = min(ticks[0], lo), max(ticks[-1], hi)
    body: list[str] = []
    legend_h = 0.0
    if color_by == "series" and len(names) > 1:
        items, legend_h = _legend([(n, color(n)) for n in names], 70, 36, width - 90)
        body += items
    max_cat = max((len(c) for c in categories), default=0)
    rotate = max_cat * 7 > (width - 90) / max(len(categories), 1)
    bottom_pad = 48 + (min(max_cat, 28) * 4.0 if rotate else 0)
    right_pad = 20 + (_text_width(reference_label, 11) + 8 if reference_label else 0)
    f = _Frame(70, 40 + legend_h + 8, width - 70 - right_pad, plot_height)
    height = f.bottom + bottom_pad

    def to_y(v: float) -> float:
        return f.bottom - (min(max(v, lo), hi) - lo) / (hi - lo) * f.height

    body += _value_axis_y(f, ticks, to_y)
    group_w = f.width / max(len(categories), 1)
    inner = group_w * 0.8
    bar_w = inner / max(len(names), 1)
    show_values = bar_w >= 22
    for ci, cat in enumerate(categories):
        gx = f.left + ci * group_w + (group_w - inner) / 2
        for si, n in enumerate(names):
            v = series[n][ci]
            x = gx + si * bar_w
            fill = color(cat) if color_by == "category" else color(n)
            tip = f"{cat} · {n}: " if len(names) > 1 else f"{cat}: "
            if v is None or not math.isfinite(v):
                body.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{f.bottom - 4:.1f}" text-anchor="middle" '
                    f'font-size="10" fill="{MUTED}">n/a</text>'
                )
                continue
            y0, y1 = to_y(max(lo, min(0.0, hi)) if lo < 0 < hi else lo), to_y(v)
            top, h = min(y0, y1), max(abs(y0 - y1), 0.5)
            body.append(
                f'<rect class="bar" x="{x + 1:.1f}" y="{top:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{fill}"><title>{escape(tip)}{fmt_num(v)}</title></rect>'
            )
            if show_values:
                body.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{top - 3:.1f}" text-anchor="middle" '
                    f'font-size="10" fill="{INK}">{fmt_num(v)}</text>'
                )
        lx, ly = f.left + ci * group_w + group_w / 2, f.bottom + 16
        if rotate:
            body.append(
                f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="end" font-size="11" fill="{INK}" '
                f'transform="rotate(-35 {lx:.1f} {ly:.1f})">{escape(cat)}</text>'
            )
        else:
            body.append(
                f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="middle" font-size="11" '
                f'fill="{INK}">{escape(cat)}</text>'
            )
    if reference is not None and lo <= reference <= hi:
        y = to_y(reference)
        body.append(
            f'<line x1="{f.left:.1f}" y1="{y:.1f}" x2="{f.right:.1f}" y2="{y:.1f}" stroke="{INK}" '
            f'stroke-dasharray="5 4" stroke-width="1.2"/>'
        )
        if reference_label:
            body.append(
                f'<text x="{f.right + 6:.1f}" y="{y + 4:.1f}" font-size="11" '
                f'fill="{INK}">{escape(reference_label)}</text>'
            )
    body.append(
        f'<line x1="{f.left:.1f}" y1="{f.bottom:.1f}" x2="{f.right:.1f}" y2="{f.bottom:.1f}" '
        f'stroke="{MUTED}"/>'
    )
    body += _axis_labels(f, x_label, y_label, x_pad=bottom_pad - 8)
    return _svg(width, height, title, body, "bar")


@dataclass(frozen=True)
class Point:
    """One scatter point: a label (also its legend entry and colour key), x, y, tooltip detail."""

    label: str
    x: float
    y: float
    detail: str = ""


def scatter_chart(
    title: str,
    points: Sequence[Point],
    *,
    colors: Mapping[str, str] | Callable[[str], str],
    x_label: str,
    y_label: str,
    front: bool = True,
    label_detail: bool = False,
    log_x: bool = False,
    x_format: Callable[[float], str] = _tick_label,
    width: float = 720,
    plot_height: float = 320,
) -> str:
    """Scatter of labelled points; with ``front``, the Pareto front (min x, max y) as a staircase.

    Args:
        title: Chart title.
        points: The points; points sharing a label share a colour and a legend entry.
        colors: Label → colour.
        x_label: X axis label with unit.
        y_label: Y axis label with unit.
        front: Draw the Pareto front and ring its points.
        label_detail: Label points with their detail (e.g. a knob setting) instead of the label.
        log_x: Logarithmic x axis (all x must be > 0).
        x_format: Tick label formatter for x.
        width: SVG width in pixels.
        plot_height: Height of the plot area.
    """
    color = colors if callable(colors) else (lambda n: colors.get(n, CATEGORICAL[0]))
    pts = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    if log_x and any(p.x <= 0 for p in pts):
        raise ValueError("log_x needs every x > 0")
    labels = list(dict.fromkeys(p.label for p in pts))
    body, legend_h = [], 0.0
    if labels:
        items, legend_h = _legend([(n, color(n)) for n in labels], 70, 36, width - 90)
        body += items
    f = _Frame(70, 40 + legend_h + 8, width - 100, plot_height)
    xs, ys = [p.x for p in pts], [p.y for p in pts]
    if log_x and pts:
        lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
        pad = max((lx1 - lx0) * 0.08, 0.05)
        lx0, lx1 = lx0 - pad, lx1 + pad
        xt = [t for t in log_ticks(10**lx0, 10**lx1)]

        def to_x(v: float) -> float:
            return f.left + (math.log10(v) - lx0) / (lx1 - lx0) * f.width
    else:
        x0, x1 = _range(xs, None, None)
        pad = (x1 - x0) * 0.08
        xt = nice_ticks(x0 - pad, x1 + pad)
        x0, x1 = xt[0], xt[-1]

        def to_x(v: float) -> float:
            return f.left + (v - x0) / (x1 - x0) * f.width
    y0, y1 = _range(ys, None, None)
    pad = (y1 - y0) * 0.1
    yt = nice_ticks(y0 - pad, y1 + pad)
    y0, y1 = yt[0], yt[-1]

    def to_y(v: float) -> float:
        return f.bottom - (v - y0) / (y1 - y0) * f.height

    body += _value_axis_y(f, yt, to_y)
    body += _value_axis_x(f, xt, to_x, x_format)
    body.append(
        f'<rect x="{f.left:.1f}" y="{f.top:.1f}" width="{f.width:.1f}" height="{f.height:.1f}" '
        f'fill="none" stroke="{MUTED}"/>'
    )
    on_front: set[int] = set()
    labels_out: list[tuple[int, float, float]] = []
    if front and pts:
        idx = pareto_front([(p.x, p.y) for p in pts])
        on_front = set(idx)
        # the attainment staircase: up from the axis to the smallest form, then right/up through
        # each front point, then on to the right edge (everything below-right is dominated)
        path = [f"M{to_x(pts[idx[0]].x):.1f},{f.bottom:.1f}"]
        for i in idx:
            x, y = to_x(pts[i].x), to_y(pts[i].y)
            path.append(f"H{x:.1f}V{y:.1f}")
        path.append(f"H{f.right:.1f}")
        body.append(
            f'<path class="pareto-front" d="{"".join(path)}" fill="none" stroke="{INK}" '
            f'stroke-width="1.5" stroke-dasharray="6 3"><title>Pareto front</title></path>'
        )
        fx, fy = f.right - 150, f.bottom - 12
        body.append(
            f'<line x1="{fx:.1f}" y1="{fy:.1f}" x2="{fx + 22:.1f}" y2="{fy:.1f}" stroke="{INK}" '
            f'stroke-dasharray="6 3" stroke-width="1.5"/><text x="{fx + 28:.1f}" y="{fy + 4:.1f}" '
            f'font-size="11" fill="{INK}">Pareto front</text>'
        )
    for i, p in enumerate(pts):
        x, y = to_x(p.x), to_y(p.y)
        tip = f"{p.label}{' · ' + p.detail if p.detail else ''}: x={x_format(p.x)}, y={fmt_num(p.y)}"
        ring = f' stroke="{INK}" stroke-width="1.5"' if i in on_front else ' stroke="#ffffff"'
        body.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color(p.label)}"{ring}>'
            f"<title>{escape(tip)}</title></circle>"
        )
        labels_out.append((i, x, y))
    placed = [(x - 7, y - 7, x + 7, y + 7) for _, x, y in labels_out]  # markers are taken
    for i, x, y in sorted(labels_out, key=lambda t: (t[2], t[1])):
        text = pts[i].label if not label_detail else (pts[i].detail or pts[i].label)
        w = _text_width(text, 10.5)
        # candidate spots, nearest first: right/left of the point, then stepping up and down;
        # a label that fits nowhere is left out (the legend and the tooltip still name the point)
        for dy in (-8, 14, -20, 26, -32, 38, -44, 50):
            for dx in (9, -9):
                x0 = x + dx if dx > 0 else x + dx - w
                box = (x0, y + dy - 10, x0 + w, y + dy + 2)
                inside = (box[0] >= f.left and box[2] <= f.right + 20 and box[1] >= f.top
                          and box[3] <= f.bottom)
                if inside and not any(
                    b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3]
                    for b in placed
                ):
                    break
            else:
                continue
            break
        else:
            continue
        placed.append(box)
        if abs(dy) > 14:  # a leader line to a label moved away from its point
            body.append(
                f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{box[0] if dx > 0 else box[2]:.1f}" '
                f'y2="{y + dy - 4:.1f}" stroke="{MUTED}" stroke-width="0.6"/>'
            )
        body.append(
            f'<text class="point-label" x="{box[0]:.1f}" y="{y + dy:.1f}" font-size="10.5" '
            f'fill="{INK}">{escape(text)}</text>'
        )
    body += _axis_labels(f, x_label, y_label)
    return _svg(width, f.bottom + 48, title, body, "scatter")


def _viridis(v: float) -> str:
    stops = [
        (0.0, (68, 1, 84)),
        (0.25, (59, 82, 139)),
        (0.5, (33, 145, 140)),
        (0.75, (94, 201, 98)),
        (1.0, (253, 231, 37)),
    ]
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):
        if v <= b:
            w = (v - a) / (b - a)
            r, g, bl = (round(x + w * (y - x)) for x, y in zip(ca, cb, strict=True))
            return f"#{r:02x}{g:02x}{bl:02x}"
    return "#fde725"


def heatmap(
    title: str,
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    x_label: str = "",
    y_label: str = "",
    value_label: str = "",
    min_span_frac: float = 0.1,
    width: float = 720,
    cell_height: float = 30,
) -> str:
    """A rows × cols heatmap on a viridis ramp (min → dark, max → yellow) with a colour bar.

    Cell values are printed when cells are wide enough.

    Args:
        title: Chart title.
        rows: Row labels (y).
        cols: Column labels (x).
        values: ``len(rows)`` lists of ``len(cols)`` numbers.
        x_label: X axis label.
        y_label: Y axis label.
        value_label: What the colour encodes (colour-bar caption, with unit).
        min_span_frac: The colour range spans at least this fraction of the largest |value|.
        width: SVG width in pixels.
        cell_height: Row height in pixels.
    """
    if len(values) != len(rows) or any(len(r) != len(cols) for r in values):
        raise ValueError(f"heatmap values must be {len(rows)} × {len(cols)}")
    flat = _finite(v for r in values for v in r)
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    # a colour range of at least min_span_frac × max|v| (centred), so that differences in the
    # last digits (or none at all) do not read as the full dark-to-yellow contrast
    min_span = max(min_span_frac * max((abs(v) for v in flat), default=1.0), 1e-6)
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    span = hi - lo
    left = 24 + max((_text_width(r, 12) for r in rows), default=40)
    f = _Frame(left, 44, width - left - 90, cell_height * len(rows))
    cw = f.width / max(len(cols), 1)
    body = []
    for ri, r in enumerate(rows):
        y = f.top + ri * cell_height
        body.append(
            f'<text x="{f.left - 6:.1f}" y="{y + cell_height / 2 + 4:.1f}" text-anchor="end" '
            f'font-size="12" fill="{INK}">{escape(r)}</text>'
        )
        for ci, c in enumerate(cols):
            v = values[ri][ci]
            x = f.left + ci * cw
            ok = v is not None and math.isfinite(v)
            fill = _viridis((v - lo) / span) if ok else "#ffffff"
            body.append(
                f'<rect class="cell" x="{x:.1f}" y="{y:.1f}" width="{cw + 0.3:.1f}" '
                f'height="{cell_height:.1f}" fill="{fill}"><title>{escape(r)} · {escape(c)}: '
                f"{fmt_num(v) if ok else 'n/a'}</title></rect>"
            )
            if cw >= 38 and ok:
                ink = "#ffffff" if (v - lo) / span < 0.6 else INK
                body.append(
                    f'<text x="{x + cw / 2:.1f}" y="{y + cell_height / 2 + 4:.1f}" '
                    f'text-anchor="middle" font-size="10.5" fill="{ink}">{fmt_num(v, 2)}</text>'
                )
    step = max(1, math.ceil(len(cols) * 40 / max(f.width, 1)))
    rotate = max((len(c) for c in cols), default=0) * 6.5 > cw * step
    for ci, c in enumerate(cols):
        if ci % step:
            continue
        x, y = f.left + ci * cw + cw / 2, f.bottom + 14
        extra = f' transform="rotate(-35 {x:.1f} {y:.1f})"' if rotate else ""
        body.append(
            f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{"end" if rotate else "middle"}" '
            f'font-size="11" fill="{INK}"{extra}>{escape(c)}</text>'
        )
    # colour bar
    bx, bh = f.right + 22, max(f.height, 60)
    n = 24
    for k in range(n):
        body.append(
            f'<rect x="{bx:.1f}" y="{f.top + bh * (1 - (k + 1) / n):.1f}" width="12" '
            f'height="{bh / n + 0.4:.1f}" fill="{_viridis(k / (n - 1))}"/>'
        )
    body.append(
        f'<text x="{bx + 16:.1f}" y="{f.top + 9:.1f}" font-size="10.5" fill="{INK}">'
        f"{fmt_num(hi, 2)}</text>"
        f'<text x="{bx + 16:.1f}" y="{f.top + bh:.1f}" font-size="10.5" fill="{INK}">'
        f"{fmt_num(lo, 2)}</text>"
    )
    if value_label:
        body.append(
            f'<text x="{bx:.1f}" y="{f.top - 8:.1f}" font-size="10.5" fill="{MUTED}">'
            f"{escape(value_label)}</text>"
        )
    col_pad = 30 + (min(max((len(c) for c in cols), default=0), 30) * 5.5 if rotate else 0)
    frame = _Frame(f.left, f.top, f.width, max(f.height, bh))
    body += _axis_labels(frame, x_label, "", x_pad=col_pad + 6)
    if y_label:
        body.append(
            f'<text x="8" y="{f.top - 10:.1f}" font-size="11" fill="{MUTED}">{escape(y_label)}</text>'
        )
    return _svg(width, frame.bottom + col_pad + 18, title, body, "heatmap")


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    colors: Mapping[str, str] | Callable[[str], str],
    x_label: str,
    y_label: str,
    x_format: Callable[[float], str] = _tick_label,
    x_ticks: Sequence[float] | None = None,
    step: Sequence[str] = (),
    points_only: Sequence[str] = (),
    value_range: tuple[float | None, float | None] = (None, None),
    width: float = 720,
    plot_height: float = 260,
) -> str:
    """Lines with point markers, one per series; series named in ``step`` are drawn as steps.

    Args:
        title: Chart title.
        series: Name → (x, y) points (sorted by x here).
        colors: Name → colour.
        x_label: X axis label with unit.
        y_label: Y axis label with unit.
        x_format: Tick label formatter for x (e.g. a date).
        x_ticks: Explicit x ticks (default: round numbers over the data).
        step: Series drawn as a step function (a running value such as the champion).
        points_only: Series drawn as hollow markers without a line (events).
        value_range: (min, max) of the y axis; ``None`` = from the data.
        width: SVG width in pixels.
        plot_height: Height of the plot area.
    """
    color = colors if callable(colors) else (lambda n: colors.get(n, CATEGORICAL[0]))
    data = {n: sorted((x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y))
            for n, pts in series.items()}
    names = [n for n in data if data[n]]
    body, legend_h = [], 0.0
    if names:
        items, legend_h = _legend([(n, color(n)) for n in names], 70, 36, width - 90, "line")
        body += items
    f = _Frame(70, 40 + legend_h + 8, width - 100, plot_height)
    xs = [x for n in names for x, _ in data[n]]
    ys = [y for n in names for _, y in data[n]]
    if x_ticks:
        xt = sorted(x_ticks)
        x0, x1 = min([xt[0], *xs]), max([xt[-1], *xs])
        pad = (x1 - x0) * 0.05 or 0.5
        x0, x1 = x0 - pad, x1 + pad
    else:
        x0, x1 = _range(xs, None, None)
        xt = nice_ticks(x0, x1)
        x0, x1 = xt[0], xt[-1]
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = _range(ys, *value_range)
    pad = (y1 - y0) * 0.1 if value_range == (None, None) else 0.0
    yt = nice_ticks(y0 - pad, y1 + pad)
    y0, y1 = yt[0], yt[-1]

    def to_x(v: float) -> float:
        return f.left + (v - x0) / (x1 - x0) * f.width

    def to_y(v: float) -> float:
        return f.bottom - (v - y0) / (y1 - y0) * f.height

    body += _value_axis_y(f, yt, to_y)
    body += _value_axis_x(f, [t for t in xt if x0 <= t <= x1], to_x, x_format)
    body.append(
        f'<rect x="{f.left:.1f}" y="{f.top:.1f}" width="{f.width:.1f}" height="{f.height:.1f}" '
        f'fill="none" stroke="{MUTED}"/>'
    )
    for n in names:
        pts = data[n]
        d = []
        for k, (x, y) in enumerate(pts):
            px, py = to_x(x), to_y(y)
            if k == 0:
                d.append(f"M{px:.1f},{py:.1f}")
            elif n in step:
                d.append(f"H{px:.1f}V{py:.1f}")
            else:
                d.append(f"L{px:.1f},{py:.1f}")
        if n in step and pts:
            d.append(f"H{f.right:.1f}")
        if n not in points_only:
            body.append(
                f'<path class="line" d="{"".join(d)}" fill="none" stroke="{color(n)}" '
                f'stroke-width="2.2"/>'
            )
        hollow = n in points_only
        for x, y in pts:
            paint = (f'r="6" fill="none" stroke="{color(n)}" stroke-width="2"' if hollow
                     else f'r="4" fill="{color(n)}" stroke="#ffffff"')
            body.append(
                f'<circle class="point" cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" {paint}>'
                f"<title>{escape(n)}: {escape(x_format(x))}, {fmt_num(y)}</title></circle>"
            )
    body += _axis_labels(f, x_label, y_label)
    return _svg(width, f.bottom + 48, title, body, "line")
