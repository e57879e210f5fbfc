"""The team dashboard: one self-contained HTML page (inline CSS and SVG, no script, no network).

Sections: the method × task accuracy tables (absolute and normalized), per-task bar charts, the
size-vs-accuracy Pareto plot of stored forms, the validation search of the scaling λ, the learned
coefficient heatmaps, the history of runs from MLflow and the lineage of the numbers shown. A
section whose inputs are missing shows a notice saying what is missing and how to produce it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from mergeflow.report import inputs, svg
from mergeflow.report.inputs import Evaluation, Missing

MODEL_NAME = "mergeflow-merged"
# forms of plots/pareto.csv drawn in the colour of their row in metrics/eval.json
FORM_ROWS = {"experts": "expert", "tall": "tall_masks", "twin": "twin_merging"}
KIND_ORDER = {"reference": 0, "merge": 1, "compressed": 2}


@dataclass
class Section:
    """One part of the page."""

    id: str
    title: str
    body: str = ""
    notices: list[Missing] = field(default_factory=list)
    intro: str = ""


@dataclass
class Report:
    """The rendered page and what went into it."""

    html: str
    figures: dict[str, str]  # figure id -> SVG
    sections: list[Section]
    headline: list[dict[str, Any]]  # one row per model: the table for Prefect/MLflow

    @property
    def missing(self) -> list[Missing]:
        """Every notice on the page."""
        return [n for s in self.sections for n in s.notices]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f} MB"


def ordered_rows(ev: Evaluation) -> list[str]:
    """Rows grouped: references (expert, base), merges, compressed forms; stable within a group."""
    ref = inputs.REFERENCE_ROWS
    return sorted(
        ev.rows,
        key=lambda r: (KIND_ORDER[ev.kind(r)], ref.index(r) if r in ref else 0, list(ev.rows).index(r)),
    )


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
        out.append(rec)
    return out


def _table(
    ev: Evaluation, key: str, mean_key: str, table_id: str, caption: str, pal: svg.Palette
) -> str:
    rows = ordered_rows(ev)
    cols = [*ev.tasks, "mean"]

    def value(r: str, c: str) -> float | None:
        return ev.rows[r][mean_key] if c == "mean" else ev.rows[r][key].get(c)

    best = {}
    for c in cols:  # best non-expert value per column (the expert row is the reference)
        vals = [value(r, c) for r in rows if r != "expert"]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        best[c] = max(vals) if vals else None
    head = "".join(f"<th scope='col'>{escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = value(r, c)
            is_best = r != "expert" and v is not None and best[c] is not None and v == best[c]
            cls = ' class="best"' if is_best else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        kind = ev.kind(r)
        body.append(
            f'<tr class="kind-{kind}" data-model="{escape(r)}"><th scope="row">'
            f'<span class="swatch" style="background:{pal(r)}"></span>{escape(r)}</th>'
            f'<td class="kind">{kind}</td>{"".join(cells)}</tr>'
        )
    return (
        f'<table id="{table_id}" class="metrics"><caption>{caption}</caption>'
        f"<thead><tr><th scope='col'>model</th><th scope='col'>kind</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )



def _figure(fig_id: str, chart: str, figures: dict[str, str], caption: str = "") -> str:
    figures[fig_id] = chart
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="fig" id="fig-{escape(fig_id)}">{chart}{cap}</figure>'


def _notice(n: Missing) -> str:
    fix = f" <span class='fix'>→ {_md_code(n.fix)}</span>" if n.fix else ""
    return (
        f'<div class="notice" role="status" data-missing="{escape(n.what)}"><strong>Missing: '
        f"{escape(n.what)}</strong> — {escape(n.why)}.{fix}</div>"
    )


def _md_code(s: str) -> str:
    """Escape, then render `backticked` parts as <code>."""
    parts = escape(s).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def section_tables(ev: Evaluation | None, notes: list[Missing], pal: svg.Palette) -> Section:
    """The method × task tables."""
    sec = Section("accuracy", "Accuracy per method and task", notices=list(notes))
    if ev is None:
        return sec
    sec.intro = (
        f"Test accuracy on {len(ev.tasks)} task(s). <em>Normalized</em> = accuracy ÷ the task's own "
        "expert (1.0 = as good as one fine-tuned model per task). The best value per column "
        "among everything but the experts is <span class='best'>highlighted</span>."
    )
    sec.body = _table(
        ev, "accuracy", "mean_accuracy", "accuracy-table", "Test accuracy (fraction correct)", pal
    ) + _table(
        ev,
        "normalized",
        "mean_normalized",
        "normalized-table",
        "Normalized accuracy (merged ÷ expert)",
        pal,
    )
    return sec


def section_bars(ev: Evaluation | None, figures: dict[str, str], pal: svg.Palette) -> Section:
    """The mean normalized overview and one bar chart per task."""
    sec = Section("per-task", "Per-task accuracy")
    if ev is None:
        sec.notices.append(Missing("metrics/eval.json", "no evaluation to plot", "`dvc repro evaluate`"))
        return sec
    rows = ordered_rows(ev)
    parts = [
        _figure(
            "mean-normalized",
            svg.bar_chart(
                "Mean normalized accuracy per method",
                rows,
                {"mean normalized": [ev.rows[r]["mean_normalized"] for r in rows]},
                colors=pal,
                color_by="category",
                x_label="method",
                y_label="mean normalized accuracy (÷ expert)",
                value_range=(0.0, None),
                reference=1.0,
                reference_label="expert = 1.0",
            ),
            figures,
        )
    ]
    for t in ev.tasks:
        expert = ev.rows.get("expert", {}).get("accuracy", {}).get(t)
        parts.append(
            _figure(
                f"task-{t}",
                svg.bar_chart(
                    f"{t}: test accuracy",
                    rows,
                    {"accuracy": [ev.rows[r]["accuracy"].get(t) for r in rows]},
                    colors=pal,
                    color_by="category",
                    x_label="method",
                    y_label="test accuracy (fraction correct)",
                    value_range=(0.0, 1.0),
                    reference=expert,
                    reference_label="expert" if expert is not None else "",
                    plot_height=220,
                ),
                figures,
            )
        )
    sec.body = f'<div class="grid">{"".join(parts)}</div>'
    return sec


def section_pareto(
    root: Path, ev: Evaluation | None, figures: dict[str, str], pal: svg.Palette
) -> Section:
    """Bytes vs accuracy of every stored form, with the Pareto front."""
    sec = Section("pareto", "Storage vs accuracy")
    pts, source, notes = inputs.pareto_points(root, ev)
    sec.notices += notes
    use_norm = bool(pts) and all(p.mean_normalized is not None for p in pts)
    chart_pts = [
        svg.Point(p.form, p.bytes / 1e6, (p.mean_normalized if use_norm else p.mean_accuracy),
                  p.setting)
        for p in pts
        if (p.mean_normalized if use_norm else p.mean_accuracy) is not None
    ]
    if not chart_pts:
        if not notes:
            sec.notices.append(Missing("plots/pareto.csv", "no stored form with both a size and "
                                       "an accuracy", "`dvc repro evaluate`"))
        return sec
    n_tasks = f"{len(ev.tasks)} " if ev else ""
    sec.intro = (
        f"Each point is one way to store the {n_tasks}task model(s): "
        "up and to the left is better; the dashed staircase joins the forms no other form beats "
        f"on both size and accuracy. Source: {escape(source)}."
    )
    sec.body = _figure(
        "pareto",
        svg.scatter_chart(
            "Accuracy vs bytes stored (Pareto front)",
            chart_pts,
            colors=lambda form: pal(FORM_ROWS.get(form, form)),
            x_label="bytes stored (MB = 10⁶ bytes)",
            y_label="mean normalized accuracy" if use_norm else "mean test accuracy",
            x_format=lambda v: f"{v:,.0f}",
            label_detail=len({p.label for p in chart_pts}) < len(chart_pts),
            width=860,
        ),
        figures,
        caption=(
            "Sizes: experts = all expert files; merges and base = one model (≈ experts ÷ tasks); "
            "TALL = archive plus θ₀ when referenced; Twin-Merging = its archive."
            if source.startswith("derived")
            else "Sizes as measured by the evaluate stage; hover a point for its setting."
        ),
    )
    return sec


def section_scaling(root: Path, figures: dict[str, str], pal: svg.Palette) -> Section:
    """Validation accuracy of each merge method over the scaling grid (plots/coefficients.csv)."""
    sec = Section("scaling", "Scaling search on validation")
    rows = inputs.read_csv(root, "plots/coefficients.csv")
    if not rows:
        sec.notices.append(Missing("plots/coefficients.csv", "not found or empty",
                                   "`dvc repro coefficients`"))
        return sec
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        try:
            series.setdefault(r["method"], []).append(
                (float(r["scaling"]), float(r["val_mean_accuracy"]))
            )
        except (KeyError, ValueError):
            continue
    if not series:
        sec.notices.append(Missing("plots/coefficients.csv", "no (method, scaling, "
                                   "val_mean_accuracy) rows", "`dvc repro coefficients`"))
        return sec
    sec.intro = "The scaling λ of each merge is chosen on validation (test is never used for tuning)."
    sec.body = _figure(
        "scaling",
        svg.line_chart(
            "Validation accuracy vs scaling λ",
            series,
            colors=pal,
            x_label="scaling λ (unitless)",
            y_label="mean validation accuracy",
        ),
        figures,
    )
    return sec


def section_heatmaps(root: Path, figures: dict[str, str]) -> Section:
    """Learned coefficients (AdaMerging, aTLAS, Concrete) as tasks × layers."""
    sec = Section("coefficients", "Learned coefficients")
    maps, notes = inputs.learned_heatmaps(root)
    sec.notices += notes
    if not maps:
        if not (root / "artifacts" / "coefficients").is_dir():
            sec.notices.append(Missing("artifacts/coefficients", "not found",
                                       "`dvc repro coefficients`"))
        else:
            sec.intro = (
                "No learned-coefficient runs in this workspace (set "
                "<code>coefficients.run_learned: true</code> in params.yaml to learn "
                "AdaMerging / aTLAS / Concrete coefficients)."
            )
        return sec
    sec.intro = "α per task and layer as learned on the data each run is allowed to see."
    parts = []
    for m in maps:
        what = f"{m.method}, " if m.method else ""
        parts.append(
            _figure(
                f"alpha-{m.run}",
                svg.heatmap(
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
                figures,
                caption=escape(m.note),
            )
        )
    sec.body = "".join(parts)
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
        rows.append({"x": i, "when": labels[-1], "run_id": e["run_id"], "best": b,
                     "parent": e.get("parent_run_id", ""), "version": None})
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
    series = {"best merge per run": best, "registered version": registered,
              "champion (registered model)": champion}
    return series, labels, rows


def section_history(root: Path, figures: dict[str, str], hist: Mapping[str, Any] | None,
                    hist_error: str) -> Section:
    """Normalized accuracy of the best merge / champion across runs, from MLflow."""
    sec = Section("history", "History across runs")
    if hist is None:
        sec.notices.append(Missing("MLflow history", hist_error or "not available"))
        return sec
    series, labels, rows = history_series(hist)
    n = len(labels)
    where = escape(hist.get("uri", ""))
    if n == 0:
        sec.body = (
            '<p class="first-run"><strong>First run</strong> — MLflow '
            f"(<code>{where}</code>) has no earlier evaluation of this pipeline to compare with.</p>"
        )
        return sec
    aliases = hist.get("aliases", {})
    champ = aliases.get("champion")
    sec.intro = (
        f"{n} finished evaluation run(s) in MLflow (<code>{where}</code>), oldest first. "
        + (f"Current champion: <strong>{MODEL_NAME} v{champ}</strong>." if champ else
           "No registered champion yet (the Prefect flow registers the best merge).")
    )
    if n == 1:
        sec.intro = (
            "<strong class='first-run'>First run</strong> — nothing earlier to compare with. "
            + sec.intro
        )
    colors = {"best merge per run": "#4e79a7", "registered version": "#f28e2b",
              "champion (registered model)": "#59a14f"}
    step = max(1, math.ceil(n / 8))
    sec.body = _figure(
        "history",
        svg.line_chart(
            "Normalized accuracy across runs",
            series,
            colors=colors,
            x_label="evaluation run, oldest → newest (start time, UTC, month-day hh:mm)",
            y_label="mean normalized accuracy (÷ expert)",
            x_format=lambda x: labels[int(round(x))][5:] if 0 <= round(x) < n else "",
            x_ticks=[float(i) for i in range(0, n, step)] if n > 1 else [-1.0, 0.0, 1.0],
            step=("champion (registered model)",),
            points_only=("registered version",),
            width=860,
        ),
        figures,
    )
    trs = []
    for r in reversed(rows[-15:]):
        b = r["best"]
        v = r["version"]
        reg = ""
        if v:
            is_champ = champ == v["version"]
            reg = f"v{v['version']}" + (" (champion)" if is_champ else "")
        link = _run_link(hist, r["parent"] or r["run_id"])
        trs.append(
            f"<tr><td>{escape(r['when'])}</td><td>{link}</td>"
            f"<td>{escape(b[0]) if b else '–'}</td><td>{_fmt(b[1] if b else None)}</td>"
            f"<td>{escape(reg)}</td></tr>"
        )
    sec.body += (
        '<table class="metrics small" id="history-table"><caption>Latest runs</caption><thead><tr>'
        "<th>start (UTC)</th><th>MLflow run</th><th>best merge</th><th>mean normalized</th>"
        f"<th>registered</th></tr></thead><tbody>{''.join(trs)}</tbody></table>"
    )
    return sec


def _run_link(hist: Mapping[str, Any], run_id: str) -> str:
    from mergeflow.tracking import run_url

    if not run_id:
        return "–"
    url = run_url(hist.get("uri", ""), hist.get("experiment_id", ""), run_id)
    short = escape(run_id[:12])
    return f'<a href="{escape(url)}"><code>{short}</code></a>' if url else f"<code>{short}</code>"


def section_lineage(root: Path, ev: Evaluation | None, hist: Mapping[str, Any] | None) -> Section:
    """Git commit, DVC revision, data hashes and the MLflow run of the numbers shown."""
    lin, notes = inputs.lineage(root)
    sec = Section("lineage", "Lineage of the model shown", notices=notes)
    best = ev.best_merge() if ev else None
    items = []
    if best:
        items.append(("best merge in this report", f"<strong>{escape(best)}</strong> (mean "
                      f"normalized {_fmt(ev.rows[best]['mean_normalized'])})"))
    items.append(("git commit", f"<code>{escape(lin.git_commit or 'unknown (not a git repo)')}</code>"))
    if lin.dvc_lock_md5:
        rev = lin.dvc_lock_rev[:12] or "never committed"
        dirty = " + uncommitted changes" if lin.dvc_lock_dirty else ""
        items.append(("DVC revision (last commit of dvc.lock)",
                      f"<code>{escape(rev)}</code>{dirty}; dvc.lock md5 "
                      f"<code>{escape(lin.dvc_lock_md5)}</code>"))
    ev_md5 = lin.stage_md5.get("evaluate", {})
    if ev_md5:
        lis = "".join(f"<li><code>{escape(p)}</code> <code class='h'>{escape(m)}</code></li>"
                      for p, m in ev_md5.items())
        items.append(("evaluate stage inputs/outputs (dvc.lock md5)", f"<ul class='md5'>{lis}</ul>"))
    recorded = ev_md5.get("metrics/eval.json")
    if recorded and lin.metrics_md5 and recorded != lin.metrics_md5:
        sec.notices.append(Missing("metrics/eval.json", "differs from the md5 dvc.lock recorded "
                                   "for it (a changed or failed evaluate run)", "`dvc repro`"))
    if lin.data:
        lis = "".join(
            f"<li><strong>{escape(t)}</strong> "
            + " ".join(f"{escape(s)} <code class='h'>{escape(h[:16])}</code>" for s, h in d.items())
            + "</li>"
            for t, d in lin.data.items()
        )
        items.append(("data (sha256 of each split, from data/tasks/*/meta.json)",
                      f"<ul class='md5'>{lis}</ul>"))
    else:
        sec.notices.append(Missing("data/tasks/*/meta.json", "no task data found",
                                   "`dvc repro prepare`"))
    if hist is not None and lin.metrics_md5:
        match = [e for e in hist.get("evaluations", [])
                 if e["tags"].get("output.metrics.md5") == lin.metrics_md5]
        if match:
            e = match[-1]
            where = _run_link(hist, e["run_id"])
            parent = e.get("parent_run_id")
            extra = f" in flow run {_run_link(hist, parent)}" if parent else ""
            for v in hist.get("versions", []):
                if parent and v["run_id"] == parent:
                    champ = hist.get("aliases", {}).get("champion") == v["version"]
                    extra += (f"; registered as <strong>{MODEL_NAME} v{v['version']}</strong>"
                              + (" (champion)" if champ else ""))
            uri = escape(hist.get("uri", ""))
            items.append(("MLflow run of this evaluation",
                          f"{where}{extra} — <code>{uri}</code>"))
        else:
            items.append(("MLflow run of this evaluation",
                          "none found with this metrics/eval.json (md5 tag "
                          "<code>output.metrics.md5</code>)"))
    if lin.incomplete_stages:
        sec.notices.append(Missing(
            "stages " + ", ".join(lin.incomplete_stages),
            "have no dvc.lock entry (not run yet, or failed)",
            "`dvc repro` (or `mergeflow run`)",
        ))
    sec.body = "<dl class='lineage'>" + "".join(
        f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in items
    ) + "</dl>"
    return sec


CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--best:#fff1b8;--warn:#fff4e5;
--warnline:#f0a020}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,
sans-serif;color:var(--ink);background:var(--bg)}
header{background:#1f2933;color:#fff;padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px}
header .meta{color:#cbd2d9;font-size:13px}
header code{color:#fff}
nav{background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;font-size:14px;
position:sticky;top:0;z-index:1}
nav a{margin-right:16px;color:#2f6fb0;text-decoration:none}
main{max-width:1500px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 22px;
margin:18px 0}
h2{font-size:18px;margin:0 0 8px}
.intro{color:var(--muted);margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0 0}
.card{background:#fff;color:var(--ink);border:1px solid var(--line);border-radius:8px;
padding:10px 16px;min-width:200px}
.card .v{font-size:22px;font-weight:600}.card .k{color:var(--muted);font-size:13px}
.status{padding:10px 16px;border-radius:6px;margin:16px 0 0;font-weight:600}
.status.failed{background:#fde8e8;border:1px solid #e15759;color:#9b1c1c}
.status.ok{background:#e8f5e9;border:1px solid #59a14f;color:#1e5c24}
.notice{background:var(--warn);border-left:4px solid var(--warnline);padding:8px 12px;margin:8px 0;
border-radius:4px}
.notice .fix{color:var(--muted)}
table.metrics{border-collapse:collapse;margin:8px 0 20px;font-variant-numeric:tabular-nums;
font-size:14px;min-width:50%}
table.metrics caption{text-align:left;font-weight:600;padding:4px 0}
table.metrics th,table.metrics td{padding:5px 12px;border-bottom:1px solid var(--line);text-align:right}
table.metrics th[scope=row],table.metrics td.kind,table.metrics thead th:first-child{text-align:left}
table.metrics thead th{background:#f0f4f8;font-weight:600}
table.metrics td.kind{color:var(--muted);font-size:12px}
table.metrics td.best,span.best{background:var(--best);font-weight:700}
tr.kind-reference th,tr.kind-reference td{color:#52606d;font-style:italic}
table.small{font-size:13px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:7px}
.tablewrap{overflow-x:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
figure.fig{margin:6px 0;padding:0}
figure.fig svg{display:block;max-width:100%;height:auto}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
dl.lineage{display:grid;grid-template-columns:max-content 1fr;gap:6px 18px;margin:0}
dl.lineage dt{color:var(--muted)}dl.lineage dd{margin:0}
ul.md5{margin:0;padding-left:18px;font-size:13px}code.h{color:var(--muted)}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.first-run{font-size:15px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:16px}
"""


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
    pal = svg.Palette(ordered_rows(ev) if ev else [])
    hist_error = ""
    if history is None:
        history, hist_error = fetch_history(root, model_name)
    figures: dict[str, str] = {}
    sections = [
        section_tables(ev, ev_notes, pal),
        section_bars(ev, figures, pal),
        section_pareto(root, ev, figures, pal),
        section_scaling(root, figures, pal),
        section_heatmaps(root, figures),
        section_history(root, figures, history, hist_error),
        section_lineage(root, ev, history),
    ]
    html = render_page(root, ev, sections, status)
    return Report(html, figures, sections, headline_rows(ev) if ev else [])


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


def _cards(ev: Evaluation | None, root: Path) -> str:
    if ev is None:
        return ""
    cards = []
    best = ev.best_merge()
    if best:
        s = ev.rows[best]
        cards.append((f"{_fmt(s['mean_normalized'])}", f"best merge: {best} (mean normalized)"))
    for r, label in (("tall_masks", "TALL masks"), ("twin_merging", "Twin-Merging")):
        if r in ev.rows and ev.rows[r]["mean_normalized"] is not None:
            cards.append((_fmt(ev.rows[r]["mean_normalized"]), f"{label} (mean normalized)"))
    comp, _ = inputs.read_json(root, "metrics/compress.json", "compress")
    try:
        cards.append((f"{comp['tall']['ratio_with_base']:.0%}", "TALL size incl. θ₀ vs all experts"))
    except (TypeError, KeyError, ValueError):
        pass
    cards.append((str(len(ev.tasks)), "tasks"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
        for v, k in cards
    ) + "</div>"


def render_page(
    root: Path, ev: Evaluation | None, sections: Sequence[Section], status: tuple[str, str] | None
) -> str:
    """Assemble the HTML document."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    banner = ""
    if status:
        kind, msg = status
        banner = f'<div class="status {escape(kind)}">{escape(msg)}</div>'
    missing = sum(len(s.notices) for s in sections)
    if missing:
        banner += (f'<div class="status failed">{missing} input(s) missing or unusable — see the '
                   "notices below.</div>")
    nav = "".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        intro = f'<p class="intro">{s.intro}</p>' if s.intro else ""
        notes = "".join(_notice(n) for n in s.notices)
        content = f'<div class="tablewrap">{s.body}</div>' if s.id == "accuracy" else s.body
        body.append(
            f'<section id="{s.id}"><h2>{escape(s.title)}</h2>{notes}{intro}{content}</section>'
        )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<title>mergeflow dashboard</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>mergeflow dashboard</h1><div class='meta'>workspace <code>{escape(str(root))}"
        f"</code> · generated {now}</div>{banner}"
        f"{_cards(ev, root)}</header>"
        f"<nav>{nav}</nav><main>{''.join(body)}</main>"
        "<footer>Generated by <code>mergeflow report</code>. Self-contained: no scripts, no network."
        "</footer></body></html>"
    )


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    status: tuple[str, str] | None = None,
    history: Mapping[str, Any] | None = None,
    figures_dir: str | Path | None = None,
) -> Report:
    """Build the report and write it atomically to ``out`` (default ``<root>/reports/index.html``).

    With ``figures_dir``, every figure is also written there as ``<id>.svg``.
    """
    from mergeflow.io import write_bytes_atomic

    root = Path(root)
    rep = build_report(root, status=status, history=history)
    out = Path(out) if out is not None else root / "reports" / "index.html"
    write_bytes_atomic(out, rep.html.encode("utf-8"))
    if figures_dir is not None:
        d = Path(figures_dir)
        d.mkdir(parents=True, exist_ok=True)
        for name, chart in rep.figures.items():
            write_bytes_atomic(d / f"{name}.svg", chart.encode("utf-8"))
    return rep
