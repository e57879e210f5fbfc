"""The team dashboard: one self-contained HTML page (inline CSS and SVG, no script, no network).

Sections: the method × task accuracy tables (absolute and normalized, with 95 % intervals and
ties called where the difference is within noise), the best merge against every other method,
per-task bar charts with error bars, the size-vs-accuracy Pareto plot of stored forms, the
validation search of the scaling λ, the learned coefficient heatmaps, the history of runs from
MLflow and the lineage of the numbers shown. A section whose inputs are missing shows a notice
saying what is missing and how to produce it.

This module gathers each section's data; :mod:`mergeflow.report.tables` builds the tables and
calls what is within noise, :mod:`mergeflow.report.charts` draws the charts, and the Jinja2
template ``templates/index.html.j2`` (autoescaped) lays out the page.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from mergeflow.report import charts, inputs
from mergeflow.report.inputs import Evaluation, Missing
from mergeflow.report.tables import Interval, comparisons, metric_tables, ordered_rows

MODEL_NAME = "mergeflow-merged"
# forms of plots/pareto.csv drawn in the colour of their row in metrics/eval.json
FORM_ROWS = {"experts": "expert", "tall": "tall_masks", "twin": "twin_merging"}
HISTORY_COLORS = {
    "best merge per run": "#4e79a7",
    "registered version": "#f28e2b",
    "champion (registered model)": "#59a14f",
}


@dataclass
class Section:
    """One part of the page: what the template renders under its heading."""

    id: str
    title: str
    notices: list[Missing] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """The rendered page and what went into it."""

    html: str
    figures: dict[str, str]  # figure id -> standalone SVG document
    sections: list[Section]
    headline: list[dict[str, Any]]  # one row per model: the table for Prefect/MLflow

    @property
    def missing(self) -> list[Missing]:
        """Every notice on the page."""
        return [n for s in self.sections for n in s.notices]


@dataclass(frozen=True)
class Figure:
    """A chart placed on the page (``<figure id="fig-<id>">``) with an optional caption."""

    chart: charts.Chart
    caption: str = ""

    @property
    def id(self) -> str:
        """The chart's id."""
        return self.chart.id

    @property
    def svg(self) -> Markup:
        """The inline ``<svg>`` (drawn here, so trusted markup)."""
        return Markup(self.chart.inline)  # matplotlib's SVG, not user text


def headline_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """The headline table as records: model, kind, accuracy per task, mean acc, mean normalized."""
    out = []
    for r in ordered_rows(ev):
        s = ev.rows[r]
        rec: dict[str, Any] = {"model": r, "kind": ev.kind(r)}
        for t in ev.tasks:
            v = s["accuracy"].get(t)
            rec[t] = None if v is None else round(v, 4)
        rec["mean accuracy"] = None if s["mean_accuracy"] is None else round(s["mean_accuracy"], 4)
        mn = s["mean_normalized"]
        rec["mean normalized"] = None if mn is None else round(mn, 4)
        ci = s["mean_normalized_ci"]
        if ci is not None:
            rec["mean normalized 95% CI"] = f"[{ci[0]:.3f}, {ci[1]:.3f}]"
        out.append(rec)
    return out


def section_tables(ev: Evaluation | None, notes: list[Missing], pal: charts.Palette) -> Section:
    """The method × task tables and the best merge against every other method."""
    sec = Section("accuracy", "Accuracy per method and task", notices=list(notes))
    if ev is None:
        return sec
    best, comps = comparisons(ev, pal)
    sec.data = {
        "n_tasks": len(ev.tasks),
        "has_intervals": ev.has_intervals,
        "tables": metric_tables(ev, pal),
        "best": best,
        "best_row": ev.rows[best] if best else None,
        "comparisons": comps if any(c.within_noise is not None for c in comps) else [],
    }
    return sec


def section_bars(ev: Evaluation | None, pal: charts.Palette) -> Section:
    """The mean normalized overview and one bar chart per task, with 95 % error bars."""
    sec = Section("per-task", "Per-task accuracy")
    if ev is None:
        sec.notices.append(
            Missing("metrics/eval.json", "no evaluation to plot", "`dvc repro evaluate`")
        )
        return sec
    rows = ordered_rows(ev)
    figs = [
        Figure(
            charts.bar_chart(
                "mean-normalized",
                "Mean normalized accuracy per method",
                rows,
                [ev.rows[r]["mean_normalized"] for r in rows],
                colors=pal,
                cis=[ev.rows[r]["mean_normalized_ci"] for r in rows],
                x_label="mean normalized accuracy (÷ expert)",
                reference=1.0,
                reference_label="expert = 1.0",
            )
        )
    ]
    for t in ev.tasks:
        expert = ev.rows.get("expert", {}).get("accuracy", {}).get(t)
        n = ev.n_test(t)
        figs.append(
            Figure(
                charts.bar_chart(
                    f"task-{t}",
                    f"{t}: test accuracy" + (f" (n = {n})" if n else ""),
                    rows,
                    [ev.rows[r]["accuracy"].get(t) for r in rows],
                    colors=pal,
                    cis=[ev.rows[r]["accuracy_ci"].get(t) for r in rows],
                    n=[ev.rows[r]["n_test"].get(t) for r in rows],
                    x_label="test accuracy (fraction correct)",
                    x_max=1.0,
                    reference=expert,
                    reference_label=f"expert {charts.fmt(expert)}" if expert is not None else "",
                )
            )
        )
    sec.data = {"figures": figs, "has_intervals": ev.has_intervals}
    return sec


def section_pareto(root: Path, ev: Evaluation | None, pal: charts.Palette) -> Section:
    """Bytes vs accuracy of every stored form, with the Pareto front."""
    sec = Section("pareto", "Storage vs accuracy")
    pts, source, notes = inputs.pareto_points(root, ev)
    sec.notices += notes
    use_norm = bool(pts) and all(p.mean_normalized is not None for p in pts)
    chart_pts = [
        charts.Point(
            p.form, p.bytes / 1e6, (p.mean_normalized if use_norm else p.mean_accuracy), p.setting
        )
        for p in pts
        if (p.mean_normalized if use_norm else p.mean_accuracy) is not None
    ]
    if not chart_pts:
        if not notes:
            sec.notices.append(
                Missing(
                    "plots/pareto.csv",
                    "no stored form with both a size and an accuracy",
                    "`dvc repro evaluate`",
                )
            )
        return sec
    derived = source.startswith("derived")
    fig = charts.scatter_chart(
        "pareto",
        "Accuracy vs bytes stored (Pareto front)",
        chart_pts,
        colors=lambda form: pal(FORM_ROWS.get(form, form)),
        x_label="bytes stored (MB = 10⁶ bytes)",
        y_label="mean normalized accuracy" if use_norm else "mean test accuracy",
        label_detail=len({p.label for p in chart_pts}) < len(chart_pts),
    )
    caption = (
        "Sizes: experts = all expert files; merges and base = one model (≈ experts ÷ tasks); "
        "TALL = archive plus θ₀ when referenced; Twin-Merging = its archive."
        if derived
        else "Sizes as measured by the evaluate stage; hover a point for its setting."
    )
    sec.data = {
        "figure": Figure(fig, caption),
        "source": source,
        "n_tasks": len(ev.tasks) if ev else None,
    }
    return sec


def section_scaling(root: Path, pal: charts.Palette) -> Section:
    """Validation accuracy of each merge method over the scaling grid (plots/coefficients.csv)."""
    sec = Section("scaling", "Scaling search on validation")
    rows = inputs.read_csv(root, "plots/coefficients.csv")
    if not rows:
        sec.notices.append(
            Missing("plots/coefficients.csv", "not found or empty", "`dvc repro coefficients`")
        )
        return sec
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        try:
            series.setdefault(r["method"], []).append(
                (float(r["scaling"]), float(r["val_mean_accuracy"]))
            )
        except (KeyError, ValueError, TypeError):
            continue
    if not series:
        sec.notices.append(
            Missing(
                "plots/coefficients.csv",
                "no (method, scaling, val_mean_accuracy) rows",
                "`dvc repro coefficients`",
            )
        )
        return sec
    sec.data = {
        "figure": Figure(
            charts.line_chart(
                "scaling",
                "Validation accuracy vs scaling λ",
                series,
                colors=pal,
                x_label="scaling λ (unitless)",
                y_label="mean validation accuracy",
            )
        )
    }
    return sec


def section_heatmaps(root: Path) -> Section:
    """Learned coefficients (AdaMerging, aTLAS, Concrete) as tasks × layers."""
    sec = Section("coefficients", "Learned coefficients")
    maps, notes = inputs.learned_heatmaps(root)
    sec.notices += notes
    if not maps:
        if not (root / "artifacts" / "coefficients").is_dir():
            sec.notices.append(
                Missing("artifacts/coefficients", "not found", "`dvc repro coefficients`")
            )
        else:
            sec.data = {"none_learned": True}
        return sec
    figs = []
    for m in maps:
        what = f"{m.method}, " if m.method else ""
        figs.append(
            Figure(
                charts.heatmap(
                    f"alpha-{m.run}",
                    f"{m.run} ({what}{m.scheme} blocks): learned α",
                    m.tasks,
                    m.layers,
                    m.values,
                    x_label=(
                        "one α per task (all layers)"
                        if m.layers == ["all layers"]
                        else "layer (emb = embeddings, Ln = transformer layer n)"
                    ),
                    y_label="task",
                    value_label="α (unitless)",
                ),
                m.note,
            )
        )
    sec.data = {"figures": figs}
    return sec


def _best_merge_score(metrics: Mapping[str, float]) -> tuple[str, float] | None:
    skip = set(inputs.REFERENCE_ROWS) | set(inputs.COMPRESSED_ROWS)
    best = None
    for k, v in sorted(metrics.items()):  # ties: alphabetically first, as Evaluation.best_merge
        if not k.endswith(".mean_normalized"):
            continue
        row = k[: -len(".mean_normalized")]
        if row in skip or not math.isfinite(v):
            continue
        if best is None or v > best[1]:
            best = (row, v)
    return best


def _when(ms: float | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if not ms:
        return "?"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime(fmt)


def history_series(hist: Mapping[str, Any]) -> tuple[dict[str, list], list[str], list[dict]]:
    """(series for the chart, x tick labels, table rows) from :func:`tracking.run_history` data.

    x = the position of a finished evaluate run in time order. ``best merge per run`` is the
    highest mean normalized accuracy of any merge in that run; ``registered`` are the versions of
    the registered model at the position of their flow run's evaluation; ``champion`` steps to a
    version when it was promoted.
    """
    evals = [e for e in hist.get("evaluations", []) if e.get("status") == "FINISHED"]
    best, labels, rows, pos_of_parent = [], [], [], {}
    for i, e in enumerate(evals):
        labels.append(_when(e.get("start_time")))
        b = _best_merge_score(e.get("metrics", {}))
        if e.get("parent_run_id"):
            pos_of_parent[e["parent_run_id"]] = i
        if b:
            best.append((float(i), b[1]))
        rows.append(
            {
                "x": i,
                "when": labels[-1],
                "run_id": e["run_id"],
                "best": b,
                "parent": e.get("parent_run_id", ""),
                "version": None,
            }
        )
    registered, champion = [], []
    for v in hist.get("versions", []):
        try:
            score = float(v["tags"].get("mean_normalized", "nan"))
        except ValueError:
            continue
        i = pos_of_parent.get(v["run_id"])
        if i is None or not math.isfinite(score):
            continue
        registered.append((float(i), score))
        rows[i]["version"] = v
        if v["tags"].get("promoted") == "true":
            champion.append((float(i), score))
    series = {
        "best merge per run": best,
        "registered version": registered,
        "champion (registered model)": champion,
    }
    return series, labels, rows


@dataclass(frozen=True)
class RunLink:
    """An MLflow run id, linked to the MLflow UI when the store is a server."""

    run_id: str
    url: str

    @property
    def short(self) -> str:
        """The first 12 characters of the id."""
        return self.run_id[:12]


def _run_link(hist: Mapping[str, Any], run_id: str) -> RunLink | None:
    from mergeflow.tracking import run_url

    if not run_id:
        return None
    return RunLink(run_id, run_url(hist.get("uri", ""), hist.get("experiment_id", ""), run_id))


def history_chart(series: Mapping[str, list], labels: Sequence[str]) -> charts.Chart:
    """The history line chart: at most ~8 dated ticks; one run is one tick on a padded axis."""
    n = len(labels)
    step = max(1, math.ceil(n / 8))
    ticks = [float(i) for i in range(0, n, step)]
    return charts.line_chart(
        "history",
        "Normalized accuracy across runs",
        series,
        colors=HISTORY_COLORS,
        x_label="evaluation run, oldest → newest (start time, UTC, month-day hh:mm)",
        y_label="mean normalized accuracy (÷ expert)",
        x_ticks=ticks,
        x_tick_labels=[labels[int(t)][5:] for t in ticks],
        step=("champion (registered model)",),
        points_only=("registered version",),
        width=9.0,
    )


def section_history(hist: Mapping[str, Any] | None, hist_error: str) -> Section:
    """Normalized accuracy of the best merge / champion across runs, from MLflow."""
    sec = Section("history", "History across runs")
    if hist is None:
        sec.notices.append(Missing("MLflow history", hist_error or "not available"))
        return sec
    series, labels, rows = history_series(hist)
    champ = hist.get("aliases", {}).get("champion")
    sec.data = {
        "n": len(labels),
        "where": hist.get("uri", ""),
        "champion": champ,
        "model": MODEL_NAME,
    }
    if not labels:
        return sec
    table = []
    for r in reversed(rows[-15:]):
        v = r["version"]
        reg = ""
        if v:
            reg = f"v{v['version']}" + (" (champion)" if champ == v["version"] else "")
        table.append(
            {
                "when": r["when"],
                "link": _run_link(hist, r["parent"] or r["run_id"]),
                "best": r["best"],
                "registered": reg,
            }
        )
    sec.data |= {"figure": Figure(history_chart(series, labels)), "rows": table}
    return sec


def section_lineage(root: Path, ev: Evaluation | None, hist: Mapping[str, Any] | None) -> Section:
    """Git commit, DVC revision, data hashes and the MLflow run of the numbers shown."""
    lin, notes = inputs.lineage(root)
    sec = Section("lineage", "Lineage of the model shown", notices=notes)
    best = ev.best_merge() if ev else None
    ev_md5 = lin.stage_md5.get("evaluate", {})
    recorded = ev_md5.get("metrics/eval.json")
    if recorded and lin.metrics_md5 and recorded != lin.metrics_md5:
        sec.notices.append(
            Missing(
                "metrics/eval.json",
                "differs from the md5 dvc.lock recorded for it (a changed or failed evaluate run)",
                "`dvc repro`",
            )
        )
    if not lin.data:
        sec.notices.append(
            Missing("data/tasks/*/meta.json", "no task data found", "`dvc repro prepare`")
        )
    mlflow: dict[str, Any] | None = None
    if hist is not None and lin.metrics_md5:
        match = [
            e
            for e in hist.get("evaluations", [])
            if e["tags"].get("output.metrics.md5") == lin.metrics_md5
        ]
        mlflow = {"found": bool(match), "uri": hist.get("uri", "")}
        if match:
            e = match[-1]
            parent = e.get("parent_run_id") or ""
            mlflow |= {
                "run": _run_link(hist, e["run_id"]),
                "parent": _run_link(hist, parent),
                "versions": [],
            }
            for v in hist.get("versions", []):
                if parent and v["run_id"] == parent:
                    mlflow["versions"].append(
                        (v["version"], hist.get("aliases", {}).get("champion") == v["version"])
                    )
    if lin.incomplete_stages:
        sec.notices.append(
            Missing(
                "stages " + ", ".join(lin.incomplete_stages),
                "have no dvc.lock entry (not run yet, or failed)",
                "`dvc repro` (or `mergeflow run`)",
            )
        )
    sec.data = {
        "lin": lin,
        "best": best,
        "best_row": ev.rows[best] if best else None,
        "evaluate_md5": ev_md5,
        "mlflow": mlflow,
        "model": MODEL_NAME,
    }
    return sec


def _cards(ev: Evaluation | None, root: Path) -> list[tuple[str, str, Interval | None]]:
    """(value, label, interval) of the header cards."""
    if ev is None:
        return []
    cards: list[tuple[str, str, Interval | None]] = []
    best = ev.best_merge()
    if best:
        s = ev.rows[best]
        cards.append(
            (
                charts.fmt(s["mean_normalized"]),
                f"best merge: {best} (mean normalized)",
                s["mean_normalized_ci"],
            )
        )
    for r, label in (("tall_masks", "TALL masks"), ("twin_merging", "Twin-Merging")):
        if r in ev.rows and ev.rows[r]["mean_normalized"] is not None:
            cards.append(
                (
                    charts.fmt(ev.rows[r]["mean_normalized"]),
                    f"{label} (mean normalized)",
                    ev.rows[r]["mean_normalized_ci"],
                )
            )
    comp, _ = inputs.read_json(root, "metrics/compress.json", "compress")
    try:
        cards.append(
            (f"{comp['tall']['ratio_with_base']:.0%}", "TALL size incl. θ₀ vs all experts", None)
        )
    except (TypeError, KeyError, ValueError):
        pass
    cards.append((str(len(ev.tasks)), "tasks", None))
    return cards


def fetch_history(root: Path, model_name: str = MODEL_NAME) -> tuple[dict | None, str]:
    """(MLflow history, "") or (None, why not) — never raises."""
    from mergeflow import tracking

    if not tracking.tracking_enabled():
        return None, "MLflow tracking is off (MERGEFLOW_TRACKING=off)"
    try:
        return tracking.run_history(root, model_name), ""
    except tracking.TrackingUnavailableError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - a broken store must not take the report down
        return None, f"could not read MLflow history ({type(err).__name__}: {err})"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _code(s: str) -> Markup:
    """Escape, then render `backticked` parts as <code>."""
    parts = str(escape(s)).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("mergeflow.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters |= {
    "num": _num,
    "ci": lambda ci, d=3: charts.fmt_ci(ci, d),
    "code": _code,
    "signed": lambda v: "–" if v is None else f"{v:+.3f}",
}


def generated_at() -> str:
    """The build time shown on the page; ``SOURCE_DATE_EPOCH`` (reproducible builds) wins."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (
        dt.datetime.fromtimestamp(int(epoch), dt.UTC)
        if epoch.isdigit()
        else dt.datetime.now(dt.UTC)
    )
    return when.strftime("%Y-%m-%d %H:%M UTC")


def render_page(
    root: Path, ev: Evaluation | None, sections: Sequence[Section], status: tuple[str, str] | None
) -> str:
    """Render the HTML document from the template."""
    return _ENV.get_template("index.html.j2").render(
        root=str(root),
        generated=generated_at(),
        status=status,
        missing=sum(len(s.notices) for s in sections),
        cards=_cards(ev, root),
        sections=sections,
    )


def build_report(
    root: str | Path,
    *,
    status: tuple[str, str] | None = None,
    history: Mapping[str, Any] | None = None,
    model_name: str = MODEL_NAME,
) -> Report:
    """Render the dashboard of the workspace ``root``.

    Args:
        root: The workspace (with ``metrics/``, ``plots/``, ``artifacts/``, ``dvc.lock``).
        status: (``ok``/``failed``, message) of the flow run that produced it, shown on top.
        history: Pre-fetched :func:`mergeflow.tracking.run_history` data; default: read MLflow
            (an unreachable server or disabled tracking becomes a notice, never an error).
        model_name: The registered model whose champion is tracked.

    Returns:
        The :class:`Report` (HTML, SVG figures, sections with their notices, headline table).
    """
    root = Path(root).resolve()
    ev, ev_notes = inputs.load_evaluation(root)
    pal = charts.Palette(ordered_rows(ev) if ev else [])
    hist_error = ""
    if history is None:
        history, hist_error = fetch_history(root, model_name)
    sections = [
        section_tables(ev, ev_notes, pal),
        section_bars(ev, pal),
        section_pareto(root, ev, pal),
        section_scaling(root, pal),
        section_heatmaps(root),
        section_history(history, hist_error),
        section_lineage(root, ev, history),
    ]
    figures = {}
    for s in sections:
        for f in [s.data.get("figure"), *s.data.get("figures", [])]:
            if f is not None:
                figures[f.id] = f.chart.svg
    html = render_page(root, ev, sections, status)
    return Report(html, figures, sections, headline_rows(ev) if ev else [])


def is_report_page(path: str | Path) -> bool:
    """Whether ``path`` is a page an earlier ``write_report`` wrote (its title, at the top)."""
    try:
        with open(path, "rb") as f:
            return b"<title>mergeflow dashboard</title>" in f.read(4096)
    except OSError:
        return False


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    status: tuple[str, str] | None = None,
    history: Mapping[str, Any] | None = None,
    figures_dir: str | Path | None = None,
    force: bool = False,
) -> Report:
    """Build the report and write it atomically to ``out`` (default ``<root>/reports/index.html``).

    With ``figures_dir``, every figure is also written there as ``<id>.svg``. An existing file at
    ``out`` is replaced only when it is an earlier report, or with ``force``; a directory there
    never (both are checked before the report is built).

    Raises:
        OutputError: ``out`` is a directory, another file (without ``force``), or cannot be
            written; ``figures_dir`` is a file.
    """
    from mergeflow.io import OutputError, check_out, write_bytes_atomic, write_error

    root = Path(root)
    out = Path(out) if out is not None else root / "reports" / "index.html"
    check_out(out, force=force or is_report_page(out), file_name="index.html")
    d = Path(figures_dir) if figures_dir is not None else None
    if d is not None and (d.exists() or d.is_symlink()) and not d.is_dir():
        raise OutputError(f"--figures {d} is a file: give a directory for the charts")
    rep = build_report(root, status=status, history=history)
    target = out
    try:
        write_bytes_atomic(out, rep.html.encode("utf-8"))
        if d is not None:
            target = d
            d.mkdir(parents=True, exist_ok=True)
            for name, chart in rep.figures.items():
                write_bytes_atomic(d / f"{name}.svg", chart.encode("utf-8"))
    except OSError as err:
        raise (write_error(err, target) or err) from None
    return rep
