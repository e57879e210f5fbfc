"""The dashboard's charts, drawn by matplotlib and returned as SVG text.

Each builder takes plain numbers (nothing here reads files or knows mergeflow's metrics) and
returns a :class:`Chart`: a standalone SVG document (``<id>.svg`` for MLflow) and the same
drawing to inline in the page. Figures are drawn on an Agg canvas inside a fixed style
(:data:`STYLE`, no global matplotlib state is changed) and saved with a fixed ``svg.hashsalt`` and
no date, so the same inputs give byte-identical SVG. Every id is prefixed with the chart's id
(several charts share one HTML page), and marks that carry a ``gid`` get a ``<title>`` tooltip.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FormatStrFormatter, FuncFormatter, MaxNLocator

INK = "#1f2933"
MUTED = "#616e7c"
GRID = "#e4e7eb"
# Colour-blind-safe categorical colours (Tableau 10 order, then a few extra distinct hues).
CATEGORICAL = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
    "#b07aa1", "#ff9da7", "#9c755f", "#17becf", "#8c564b", "#bcbd22",
)
# Fixed colours for the rows every run has, so they never change between reports.
FIXED = {"expert": "#3b3b3b", "base": "#a5acb5"}

STYLE = {
    "svg.hashsalt": "mergeflow",  # ids from content + this salt, not random: reproducible SVG
    "svg.fonttype": "none",  # text stays text (selectable, searchable, small)
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 9.5,
    "axes.labelcolor": MUTED,
    "axes.edgecolor": "#9aa5b1",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.axisbelow": True,
    "axes.formatter.useoffset": False,  # never "+1.00156" offsets on a narrow axis
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "xtick.labelcolor": INK,
    "ytick.labelcolor": INK,
    "grid.color": GRID,
    "grid.linewidth": 0.8,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "text.color": INK,
}


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


Colors = Palette | Mapping[str, str] | Callable[[str], str]


def _color(colors: Colors, name: str) -> str:
    if isinstance(colors, Mapping):
        return colors.get(name, CATEGORICAL[0])
    return colors(name)


@dataclass(frozen=True)
class Chart:
    """One rendered chart.

    Attributes:
        id: Its id on the page (``fig-<id>``) and file name (``<id>.svg``).
        svg: The standalone SVG document.
    """

    id: str
    svg: str

    @property
    def inline(self) -> str:
        """The ``<svg>`` element alone, to place in HTML (no XML declaration or DOCTYPE)."""
        return self.svg[self.svg.index("<svg") :]


def fmt(v: float | None, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals, ``n/a`` when missing or not finite."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    """``[lo, hi]`` of an interval, empty when there is none."""
    return "" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _new(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # text metrics for the layout and label placement; no pyplot, no GUI
    return fig


def _render(chart_id: str, fig: Figure, title: str, tips: Mapping[str, str]) -> Chart:
    """Save ``fig`` as SVG, make its ids unique on the page and attach the tooltips."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                              "Type": None})
    text = buf.getvalue()
    pre = re.sub(r"[^A-Za-z0-9_-]", "_", chart_id)
    text = re.sub(r'\bid="([^"]+)"', rf'id="{pre}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{pre}-\1)", text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{pre}-\1"', text)
    for gid, tip in tips.items():
        tag = f'<g id="{pre}-{gid}">'
        text = text.replace(tag, f"{tag}<title>{escape(tip)}</title>", 1)
    text = text.replace(
        "<svg ", f'<svg class="chart" role="img" aria-label="{escape(title)}" ', 1
    )
    return Chart(chart_id, text)


def _chart(chart_id: str, title: str, width: float, height: float,
           draw: Callable[[Figure, dict[str, str]], None]) -> Chart:
    with mpl.rc_context(STYLE):
        fig = _new(width, height)
        tips: dict[str, str] = {}
        draw(fig, tips)
        return _render(chart_id, fig, title, tips)


def bar_chart(
    chart_id: str,
    title: str,
    names: Sequence[str],
    values: Sequence[float | None],
    *,
    colors: Colors,
    cis: Sequence[Sequence[float] | None] | None = None,
    n: Sequence[int | None] | None = None,
    x_label: str = "",
    x_max: float | None = None,
    reference: float | None = None,
    reference_label: str = "",
) -> Chart:
    """Horizontal bars, one per name (top to bottom), with 95 % error bars where given.

    Args:
        chart_id: Id of the chart.
        title: Title above the plot.
        names: One bar per name, coloured by ``colors(name)``.
        values: The bar lengths; None / NaN draws no bar and says ``n/a``.
        colors: Name → colour.
        cis: Per bar ``(lo, hi)`` of its interval, or None (no error bar).
        n: Per bar the number of test texts (shown in the tooltip).
        x_label: Label of the value axis.
        x_max: Upper end of the value axis (default: fitted to the values and intervals).
        reference: Draw a dashed line at this value (e.g. the expert).
        reference_label: Its label.

    Returns:
        The chart; bar ``i`` has the tooltip ``name: value [lo, hi]``.

    Raises:
        ValueError: If ``values``/``cis`` do not match ``names``.
    """
    if len(values) != len(names) or (cis is not None and len(cis) != len(names)):
        raise ValueError(f"{len(values)} values / {len(cis or values)} intervals for "
                         f"{len(names)} bars")
    cis = list(cis) if cis is not None else [None] * len(names)
    n = list(n) if n is not None else [None] * len(names)

    def draw(fig: Figure, tips: dict[str, str]) -> None:
        ax = fig.add_subplot()
        ends = [ci[1] if ci else v for v, ci in zip(values, cis, strict=True) if _finite(v)]
        top = x_max if x_max is not None else max([*ends, reference or 0.0, 1e-9]) * 1.05
        shown = [i for i, v in enumerate(values) if _finite(v)]
        bars = ax.barh(shown, [values[i] for i in shown], height=0.7,
                       color=[_color(colors, names[i]) for i in shown])
        for i, bar in zip(shown, bars, strict=True):
            bar.set_gid(f"bar{i}")
        with_ci = [i for i in shown if cis[i] is not None]
        if with_ci:
            err = ax.errorbar([values[i] for i in with_ci], with_ci, fmt="none", ecolor=INK,
                              xerr=[[values[i] - cis[i][0] for i in with_ci],
                                    [cis[i][1] - values[i] for i in with_ci]],
                              elinewidth=1.1, capsize=3, capthick=1.1, label="95 % interval")
            err.lines[2][0].set_gid("errors")  # the interval lines (lines[1] are the caps)
        for i, (name, v, ci) in enumerate(zip(names, values, cis, strict=True)):
            if not _finite(v):
                ax.text(top * 0.01, i, "n/a", va="center", fontsize=9, color=MUTED,
                        gid=f"bar{i}")
                tips[f"bar{i}"] = f"{name}: n/a"
                continue
            tips[f"bar{i}"] = (f"{name}: {fmt(v)}" + (f" {fmt_ci(ci)}" if ci else "")
                               + (f", n={n[i]}" if n[i] else ""))
            end = max(v, ci[1]) if ci else v
            ax.text(end + top * 0.012, i, fmt(v), va="center", fontsize=8.5, color=INK, zorder=4,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85})
        if reference is not None and _finite(reference):
            ax.axvline(reference, color=MUTED, linestyle="--", linewidth=1.2, zorder=3)
            right = reference > top * 0.6  # label on the side with room
            ax.text(reference, -0.95, f"{reference_label}  " if right else f"  {reference_label}",
                    color=MUTED, fontsize=8.5, va="center", ha="right" if right else "left")
        ax.set_ylim(len(names) - 0.5, -1.4)  # first name on top, headroom for the reference
        ax.set_yticks(range(len(names)), [str(x) for x in names])
        ax.set_xlim(0, top * 1.12)  # room right of the longest bar for its value
        ax.xaxis.set_major_locator(FixedLocator(_ticks_upto(top)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="x")
        ax.set_xlabel(x_label)
        ax.set_title(title)
        if with_ci:
            ax.legend(loc="lower right", fontsize=8, handlelength=1.5,
                      bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)

    return _chart(chart_id, title, 6.4, 1.05 + 0.27 * len(names), draw)


def _y_format(ax) -> None:
    """Round y ticks, labelled with as many decimals as their step needs (0.05 → 2, 0.005 → 3)."""
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    step = min((b - a for a, b in zip(ticks, ticks[1:], strict=False)), default=1.0)
    digits = next((d for d in range(6) if abs(round(step, d) - step) < step * 1e-6), 6)
    ax.yaxis.set_major_formatter(FormatStrFormatter(f"%.{digits}f"))


def _ticks_upto(top: float) -> list[float]:
    """Round ticks from 0 to at most ``top`` (steps 0.1/0.2/… or 10^k multiples)."""
    loc = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
    return [t for t in loc.tick_values(0.0, top) if -1e-12 <= t <= top + 1e-12]


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


@dataclass(frozen=True)
class Point:
    """One point of a scatter chart: its series (colour), position and a detail for its label."""

    label: str
    x: float
    y: float
    detail: str = ""


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def scatter_chart(
    chart_id: str,
    title: str,
    points: Sequence[Point],
    *,
    colors: Colors,
    x_label: str,
    y_label: str,
    label_detail: bool = False,
) -> Chart:
    """Points with the Pareto front (less x, more y is better) as a dashed staircase.

    Points are labelled beside the marker where a label fits without covering another label or
    marker (front points first); the rest are named by the legend and their tooltip.

    Args:
        chart_id: Id of the chart.
        title: Title above the plot.
        points: The points; ``colors(point.label)`` colours each.
        colors: Label → colour.
        x_label: Label of the x axis.
        y_label: Label of the y axis.
        label_detail: Add ``point.detail`` to labels (several points share a label).

    Returns:
        The chart; point ``i`` has the gid ``pt<i>`` and a tooltip, front points a dark ring.
    """
    front = set(pareto_front([(p.x, p.y) for p in points]))

    def draw(fig: Figure, tips: dict[str, str]) -> None:
        ax = fig.add_subplot()
        for i, p in enumerate(points):
            on = i in front
            m = ax.scatter([p.x], [p.y], s=64 if on else 44, color=_color(colors, p.label),
                           edgecolors=INK if on else "white", linewidths=1.6 if on else 0.8,
                           zorder=4)
            m.set_gid(f"pt{i}")
            what = f"{p.label} ({p.detail})" if p.detail else p.label
            tips[f"pt{i}"] = (f"{what}: {p.x:,.1f} MB, {fmt(p.y)}"
                              + (" — on the Pareto front" if on else ""))
        xs = [p.x for p in points]
        ys = [p.y for p in points]
        lo_y, hi_y = min(ys), max(ys)
        pad_y = max((hi_y - lo_y) * 0.12, 0.02)
        ax.set_ylim(lo_y - pad_y, hi_y + pad_y)
        ax.set_xlim(0, max(xs) * 1.12 if max(xs) > 0 else 1.0)
        f = sorted(front, key=lambda i: points[i].x)
        if f:
            fx = [points[i].x for i in f] + [ax.get_xlim()[1]]
            fy = [points[i].y for i in f] + [points[f[-1]].y]
            line = ax.step(fx, fy, where="post", linestyle="--", color=MUTED, linewidth=1.2,
                           zorder=2, label="Pareto front")[0]
            line.set_gid("front")
            tips["front"] = "Pareto front: no other form is both smaller and more accurate"
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        _y_format(ax)
        ax.grid(True)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        fig.canvas.draw()  # final layout, so label boxes are measured where they will be
        renderer = fig.canvas.get_renderer()
        taken = [ax.transData.transform((p.x, p.y)) for p in points]
        # keep labels clear of other markers, so a label never sits beside a point not its own
        marker_boxes = [mpl.transforms.Bbox.from_bounds(x - 14, y - 9, 28, 18) for x, y in taken]
        placed, dropped = [], []
        area = ax.get_window_extent(renderer)
        for i in sorted(range(len(points)), key=lambda i: (i not in front, i)):
            p = points[i]
            text = f"{p.label} · {p.detail}" if label_detail and p.detail else p.label
            for dx, dy, ha in ((7, 4, "left"), (7, -11, "left"), (-7, 4, "right"),
                               (-7, -11, "right"), (0, 9, "center"), (0, -17, "center")):
                ann = ax.annotate(text, (p.x, p.y), xytext=(dx, dy), textcoords="offset points",
                                  ha=ha, fontsize=8.5, color=INK, zorder=5)
                box = ann.get_window_extent(renderer)
                inside = (box.x0 >= area.x0 and box.x1 <= area.x1 and box.y0 >= area.y0
                          and box.y1 <= area.y1)
                clash = any(_overlaps(box, b) for b in placed) or any(
                    _overlaps(box, b) for j, b in enumerate(marker_boxes) if j != i
                )
                if inside and not clash:
                    ann.set_gid(f"label{i}")
                    placed.append(box)
                    break
                ann.remove()
            else:
                dropped.append(p.label)
        if dropped:  # the unlabelled points are named by the legend
            seen: dict[str, str] = {}
            for p in points:
                seen.setdefault(p.label, _color(colors, p.label))
            for name, c in seen.items():
                ax.scatter([], [], color=c, s=30, label=name)
        ax.legend(loc="lower right", fontsize=8, ncols=2 if dropped else 1)

    return _chart(chart_id, title, 9.0, 4.4, draw)


def line_chart(
    chart_id: str,
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    colors: Colors,
    x_label: str,
    y_label: str,
    x_ticks: Sequence[float] | None = None,
    x_tick_labels: Sequence[str] | None = None,
    step: Sequence[str] = (),
    points_only: Sequence[str] = (),
    min_y_span: float = 0.05,
    width: float = 7.2,
) -> Chart:
    """Lines with markers, one per series (points sorted by x).

    Args:
        chart_id: Id of the chart.
        title: Title above the plot.
        series: Name → ``(x, y)`` points; empty series are left out.
        colors: Name → colour.
        x_label: Label of the x axis.
        y_label: Label of the y axis.
        x_ticks: Tick positions on x (default: matplotlib's).
        x_tick_labels: Labels of ``x_ticks``.
        step: Series drawn as a step that holds its value to the right edge (e.g. the champion).
        points_only: Series drawn as markers without a line.
        min_y_span: The y axis spans at least this much (one value gets a padded window with
            readable ticks, not a sliver labelled with five significant digits).
        width: Figure width in inches.

    Returns:
        The chart; series ``name`` has the gid ``series<k>`` (k = its position in ``series``).
    """
    drawn = {k: sorted(v) for k, v in series.items() if v}

    def draw(fig: Figure, tips: dict[str, str]) -> None:
        ax = fig.add_subplot()
        xs = [x for pts in drawn.values() for x, _ in pts]
        ys = [y for pts in drawn.values() for _, y in pts]
        x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x_ticks:
            x_lo, x_hi = min(x_lo, *x_ticks), max(x_hi, *x_ticks)
        pad_x = (x_hi - x_lo) * 0.04 if x_hi > x_lo else 1.0
        ax.set_xlim(x_lo - pad_x, x_hi + pad_x)
        for k, (name, pts) in enumerate(series.items()):
            if not pts:
                continue
            px, py = zip(*sorted(pts), strict=True)
            c = _color(colors, name)
            if name in step:
                (h,) = ax.step([*px, x_hi + pad_x], [*py, py[-1]], where="post", color=c,
                               linewidth=2, label=name, zorder=2)
            elif name in points_only:  # hollow, so a point drawn under it stays visible
                (h,) = ax.plot(px, py, "D", markeredgecolor=c, markerfacecolor="none",
                               markeredgewidth=1.6, markersize=9, linestyle="none", label=name,
                               zorder=3)
            else:
                (h,) = ax.plot(px, py, "-o", color=c, linewidth=1.8, markersize=5, label=name)
            h.set_gid(f"series{k}")
            tips[f"series{k}"] = name + ": " + ", ".join(f"{y:.3f}" for y in py[-12:])
        if ys:
            lo, hi = min(ys), max(ys)
            if hi - lo < min_y_span:
                mid = (lo + hi) / 2
                lo, hi = mid - min_y_span / 2, mid + min_y_span / 2
            pad = (hi - lo) * 0.1
            ax.set_ylim(lo - pad, hi + pad)
        _y_format(ax)
        if x_ticks is not None:
            ax.set_xticks(list(x_ticks), list(x_tick_labels) if x_tick_labels else None)
        ax.grid(True)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        if drawn:
            ax.legend(loc="best", fontsize=8.5)

    return _chart(chart_id, title, width, 3.8, draw)


def heatmap(
    chart_id: str,
    title: str,
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    x_label: str = "",
    y_label: str = "",
    value_label: str = "",
) -> Chart:
    """A rows × cols grid coloured by value (viridis), each cell labelled with its value.

    Nearly constant values get one mid colour rather than the full dark-to-yellow contrast.

    Args:
        chart_id: Id of the chart.
        title: Title above the plot.
        rows: Row labels (top to bottom).
        cols: Column labels (left to right).
        values: ``len(rows)`` lists of ``len(cols)`` values.
        x_label: Label under the columns.
        y_label: Label beside the rows.
        value_label: Label of the colour bar.

    Returns:
        The chart.

    Raises:
        ValueError: If ``values`` is not ``len(rows) × len(cols)``.
    """
    if len(values) != len(rows) or any(len(r) != len(cols) for r in values):
        raise ValueError(f"heatmap needs {len(rows)} × {len(cols)} values")
    flat = [v for r in values for v in r if math.isfinite(v)]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    constant = hi - lo < 1e-3 * max(1.0, abs(hi))
    if constant:  # colour every cell at the middle of the scale
        lo, hi = lo - 1.0, hi + 1.0
    shades = [[(lo + hi) / 2 if constant and math.isfinite(v) else v for v in r] for r in values]
    cmap = mpl.colormaps["viridis"]

    def draw(fig: Figure, tips: dict[str, str]) -> None:
        ax = fig.add_subplot()
        mesh = ax.pcolormesh(shades, cmap=cmap, vmin=lo, vmax=hi, edgecolors="white",
                             linewidth=0.6)
        mesh.set_gid("cells")
        size = 8 if len(cols) <= 10 else 6.5
        for i, r in enumerate(values):
            for j, v in enumerate(r):
                if not math.isfinite(v):
                    continue
                shade = (v - lo) / (hi - lo)
                ax.text(j + 0.5, i + 0.5, f"{v:.2f}", ha="center", va="center", fontsize=size,
                        color=INK if shade > 0.55 else "white")
        ax.set_xticks([j + 0.5 for j in range(len(cols))], [str(c) for c in cols])
        ax.set_yticks([i + 0.5 for i in range(len(rows))], [str(r) for r in rows])
        ax.invert_yaxis()
        ax.tick_params(length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        bar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label(value_label)
        bar.outline.set_visible(False)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        if flat:
            tips["cells"] = f"{len(rows)} × {len(cols)} values from {min(flat):.3g} to {max(flat):.3g}"

    width = min(12.0, 2.6 + 0.62 * len(cols))
    return _chart(chart_id, title, max(width, 5.0), 1.5 + 0.42 * len(rows), draw)
