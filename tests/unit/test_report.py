"""The dashboard: matplotlib charts, intervals and noise calls, and behaviour on missing inputs."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mergeflow.report import build_report, charts, write_report
from mergeflow.report.build import history_series
from mergeflow.report.tables import column_marks, mover_within_noise

NS = "{http://www.w3.org/2000/svg}"
TASKS = ["alpha", "beta", "gamma"]
EMPTY_HISTORY = {"uri": "sqlite:///x/mlflow.db", "experiment_id": "", "evaluations": [],
                 "flows": {}, "versions": [], "aliases": {}}


def parse(svg: str) -> ET.Element:
    """Parse an SVG document (fails the test if it is not well-formed XML)."""
    return ET.fromstring(svg)


def group(root: ET.Element, gid: str) -> ET.Element:
    found = [g for g in root.iter(f"{NS}g") if g.get("id") == gid]
    assert len(found) == 1, f"{gid}: {len(found)} groups"
    return found[0]


def tooltip(root: ET.Element, gid: str) -> str:
    return group(root, gid).find(f"{NS}title").text


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{NS}text")]


def tick_labels(root: ET.Element, axis: str) -> list[str]:
    """Tick label texts of the x or y axis (matplotlib's ``xtick_N`` / ``ytick_N`` groups)."""
    return ["".join(t.itertext()) for g in root.iter(f"{NS}g")
            if re.search(rf"-{axis}tick_\d+$", g.get("id", "")) for t in g.iter(f"{NS}text")]


def x_extent(path: ET.Element) -> tuple[float, float]:
    xs = [float(x) for x in re.findall(r"[ML] ([\d.]+) ", path.get("d"))]
    return min(xs), max(xs)


# --- charts --------------------------------------------------------------------------------------


def test_palette_is_stable_and_distinct():
    p = charts.Palette(["expert", "ties", "task_arithmetic", "base"])
    assert p("expert") == charts.FIXED["expert"] and p("base") == charts.FIXED["base"]
    assert p("ties") != p("task_arithmetic")
    assert p("ties") == charts.Palette(["expert", "ties"])("ties")  # same order, same colour
    assert len(set(p.mapping().values())) == 4


def test_pareto_front_keeps_only_undominated_points_in_x_order():
    pts = [(100, 0.9), (50, 0.8), (50, 0.7), (200, 0.95), (150, 0.85), (10, 0.5)]
    assert charts.pareto_front(pts) == [5, 1, 0, 3]
    assert charts.pareto_front([]) == []
    assert charts.pareto_front([(1, 1)]) == [0]


def bars(**kw) -> charts.Chart:
    args = {"colors": {"a": "#111111", "b": "#222222", "c": "#333333"}, "x_max": 1.0}
    return charts.bar_chart("acc", "Accuracy", ["a", "b", "c"], [0.5, 0.8, None],
                            **(args | kw))


def test_bar_chart_draws_each_interval_to_scale_with_its_tooltip():
    chart = bars(cis=[(0.4, 0.6), (0.7, 0.85), None], n=[100, 100, None], x_label="accuracy")
    root = parse(chart.svg)
    assert tooltip(root, "acc-bar0") == "a: 0.500 [0.400, 0.600], n=100"
    assert tooltip(root, "acc-bar1") == "b: 0.800 [0.700, 0.850], n=100"
    assert tooltip(root, "acc-bar2") == "c: n/a"
    assert not any(g.get("id") == "acc-bar2" and g.find(f"{NS}path") is not None
                   for g in root.iter(f"{NS}g"))  # the missing value draws no bar
    x0, xa = x_extent(group(root, "acc-bar0").find(f"{NS}path"))
    _, xb = x_extent(group(root, "acc-bar1").find(f"{NS}path"))
    assert (xb - x0) / (xa - x0) == pytest.approx(0.8 / 0.5, rel=1e-3)
    scale = (xa - x0) / 0.5  # pixels per unit of accuracy
    spans = sorted(x_extent(p) for p in group(root, "acc-errors").iter(f"{NS}path"))
    assert len(spans) == 2  # one error bar per value with an interval
    for (lo, hi), (want_lo, want_hi) in zip(spans, [(0.4, 0.6), (0.7, 0.85)], strict=True):
        assert (lo - x0) / scale == pytest.approx(want_lo, abs=1e-3)
        assert (hi - x0) / scale == pytest.approx(want_hi, abs=1e-3)
    words = texts(root)
    assert {"Accuracy", "accuracy", "a", "b", "c", "n/a", "0.500", "95 % interval"} <= set(words)
    with pytest.raises(ValueError, match="3 bars"):
        charts.bar_chart("x", "x", ["a", "b", "c"], [1, 2], colors={})


def test_charts_are_reproducible_and_their_ids_unique_per_chart():
    a, b = bars(cis=[(0.4, 0.6), (0.7, 0.85), None]), bars(cis=[(0.4, 0.6), (0.7, 0.85), None])
    assert a.svg == b.svg  # byte-identical: fixed hashsalt, no date
    other = charts.bar_chart("other", "Accuracy", ["a", "b", "c"], [0.5, 0.8, None],
                             colors={}, x_max=1.0)
    ids_a = set(re.findall(r'id="([^"]+)"', a.inline))
    ids_o = set(re.findall(r'id="([^"]+)"', other.inline))
    assert ids_a and all(i.startswith("acc-") for i in ids_a) and not ids_a & ids_o
    refs = re.findall(r'(?:href="|url\()#([^")]+)', a.inline)
    assert refs and set(refs) <= ids_a  # every internal reference resolves within the chart
    assert a.inline.startswith('<svg class="chart" role="img" aria-label="Accuracy"')
    assert a.svg.startswith("<?xml") and "<script" not in a.svg and "<metadata" not in a.svg


def test_one_point_history_has_a_padded_axis_with_readable_ticks():
    chart = charts.line_chart("h", "H", {"best": [(0.0, 1.00156)]}, colors={}, x_label="run",
                              y_label="acc", x_ticks=[0.0], x_tick_labels=["11-14 22:13"])
    root = parse(chart.svg)
    ys = tick_labels(root, "y")
    assert len(ys) >= 3 and len(set(ys)) == len(ys), ys
    assert all(re.fullmatch(r"\d\.\d{1,3}", y) for y in ys), ys  # not "1.00156" five times
    assert float(ys[0]) < 1.00156 < float(ys[-1])
    assert tick_labels(root, "x") == ["11-14 22:13"]
    # several runs: ticks follow the data's own scale
    wide = parse(charts.line_chart("w", "W", {"s": [(0, 0.5), (1, 0.9)]}, colors={},
                                   x_label="", y_label="").svg)
    assert all(re.fullmatch(r"\d\.\d{1,2}", y) for y in tick_labels(wide, "y"))


def test_line_chart_series_sorted_step_and_points_only():
    chart = charts.line_chart("l", "L", {"a": [(2, 0.5), (0, 0.4), (1, 0.45)], "b": [(1, 0.6)],
                                         "c": [(0, 0.55)]},
                              colors={"a": "#123456", "b": "#654321", "c": "#abcdef"},
                              x_label="run", y_label="acc", step=("b",), points_only=("c",))
    root = parse(chart.svg)
    assert tooltip(root, "l-series0") == "a: 0.400, 0.450, 0.500"  # sorted by x
    step = group(root, "l-series1").find(f"{NS}path")
    lo, hi = x_extent(step)
    assert hi - lo > 0  # the one-point step series runs on to the right edge
    assert "stroke: #654321" in step.get("style")
    assert group(root, "l-series2").find(f"{NS}path") is None  # markers only, no line


def test_heatmap_cells_colour_from_min_to_max_with_values():
    chart = charts.heatmap("h", "H", ["t1", "t2"], ["L0", "L1", "L2"],
                           [[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]], x_label="layer", value_label="α")
    root = parse(chart.svg)
    cells = list(group(root, "h-cells").iter(f"{NS}path"))
    assert len(cells) == 6
    fills = [re.search(r"fill: (#\w+)", c.get("style")).group(1) for c in cells]
    assert fills[0] == "#440154" and fills[2] == "#fde725"  # viridis ends
    assert texts(root).count("1.00") == 3 and "0.50" in texts(root)
    assert {"t1", "t2", "L0", "L2", "layer", "α"} <= set(texts(root))
    with pytest.raises(ValueError, match="2 × 3"):
        charts.heatmap("h", "H", ["t1", "t2"], ["a", "b", "c"], [[1, 2, 3]])
    flat = parse(charts.heatmap("f", "F", ["t"], ["a", "b"], [[0.5, 0.50001]]).svg)
    fills = {re.search(r"fill: (#\w+)", c.get("style")).group(1)
             for c in group(flat, "f-cells").iter(f"{NS}path")}
    assert len(fills) == 1 and fills.isdisjoint({"#440154", "#fde725"})


def test_scatter_rings_the_front_and_labels_only_where_a_label_fits():
    pts = [charts.Point("experts", 300, 1.0), charts.Point("ties", 100, 0.8),
           charts.Point("base", 100, 0.5), charts.Point("tall", 160, 0.97)]
    root = parse(charts.scatter_chart("p", "P", pts, colors=charts.Palette(), x_label="MB",
                                      y_label="acc").svg)
    on_front = [i for i in range(4) if tooltip(root, f"p-pt{i}").endswith("on the Pareto front")]
    assert on_front == [0, 1, 3]
    assert tooltip(root, "p-pt1") == "ties: 100.0 MB, 0.800 — on the Pareto front"
    assert {"experts", "ties", "base", "tall"} <= set(texts(root))  # room for every label
    crowded = [charts.Point(f"method_{i}", 100, 0.9 + 0.002 * i) for i in range(12)]
    crowded.append(charts.Point("experts", 800, 1.0))
    root = parse(charts.scatter_chart("c", "C", crowded, colors=charts.Palette(), x_label="MB",
                                      y_label="acc").svg)
    labels = [g for g in root.iter(f"{NS}g") if re.fullmatch(r"c-label\d+", g.get("id", ""))]
    assert 1 <= len(labels) < 12  # a stack of points cannot all be labelled beside themselves
    legend = set(texts(root)) - {"".join(g.itertext()).strip() for g in labels}
    assert {f"method_{i}" for i in range(12)} <= legend | {"".join(g.itertext()).strip()
                                                             for g in labels}


# --- noise calls ---------------------------------------------------------------------------------


def test_mover_difference_interval_closed_form():
    # 0.03 − sqrt(0.02² + 0.02²) = 0.0017 > 0: a real difference; 0.01 − 0.028 < 0: noise
    assert not mover_within_noise(0.88, (0.86, 0.90), 0.85, (0.83, 0.87))
    assert mover_within_noise(0.88, (0.86, 0.90), 0.87, (0.85, 0.89))


def test_column_marks_best_tie_and_paired_precedence():
    vals = {"a": 0.88, "b": 0.87, "c": 0.85}
    cis = {r: (v - 0.02, v + 0.02) for r, v in vals.items()}
    assert column_marks(vals, cis) == {"a": "tie", "b": "tie"}  # b within noise, c not
    assert column_marks({"a": 0.88, "c": 0.85}, cis) == {"a": "best"}
    assert column_marks(vals, {}) == {"a": "best"}  # no intervals: the top value, as before
    assert column_marks({"a": 0.8, "b": 0.8}, {}) == {"a": "tie", "b": "tie"}
    assert column_marks({"a": None, "b": float("nan")}, {}) == {}
    paired = {"a": {"b": {"within_noise": False}, "c": {"within_noise": True}}}
    assert column_marks(vals, cis, paired) == {"a": "tie", "c": "tie"}  # paired wins


# --- the report on fabricated workspaces ---------------------------------------------------------

EXPERT = {"alpha": 0.9, "beta": 0.8, "gamma": 0.95}
ACCURACY = {
    "expert": EXPERT,
    "base": {"alpha": 0.5, "beta": 0.3, "gamma": 0.2},
    "task_arithmetic": {"alpha": 0.8, "beta": 0.7, "gamma": 0.9},
    "ties": {"alpha": 0.85, "beta": 0.6, "gamma": 0.92},
    "tall_masks": {"alpha": 0.88, "beta": 0.79, "gamma": 0.95},
    "twin_merging": {"alpha": 0.87, "beta": 0.75, "gamma": 0.9},
}
N_TEST = {"alpha": 200, "beta": 150, "gamma": 300}
# paired half-widths: these two pairs are within noise, every other pair is told apart
NOISY = {frozenset({"task_arithmetic", "ties"}): 0.03, frozenset({"tall_masks", "twin_merging"}): 0.05}


def summary_row(accs: dict[str, float]) -> dict:
    norm = {t: a / EXPERT[t] for t, a in accs.items()}
    ma, mn = sum(accs.values()) / len(accs), sum(norm.values()) / len(norm)
    return {"accuracy": accs, "normalized": norm, "mean_accuracy": ma, "mean_normalized": mn,
            "accuracy_ci": {t: [round(a - 0.02, 4), round(min(a + 0.02, 1.0), 4)]
                            for t, a in accs.items()},
            "n_test": N_TEST, "mean_accuracy_ci": [ma - 0.01, ma + 0.01],
            "mean_normalized_ci": [mn - 0.01, mn + 0.01]}


def eval_json() -> dict:
    rows = {r: summary_row(a) for r, a in ACCURACY.items()}
    for r, s in rows.items():
        s["paired"] = {}
        for o, t in rows.items():
            if o != r:
                d = s["mean_normalized"] - t["mean_normalized"]
                h = NOISY.get(frozenset({r, o}), 0.005)
                s["paired"][o] = {"diff": d, "ci": [d - h, d + h], "within_noise": h > abs(d)}
    return rows


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A workspace with every input the report reads (small, fabricated)."""
    return fabricate(tmp_path)


def fabricate(tmp_path: Path) -> Path:
    """Write fabricated metrics (with intervals), plots and task metadata into ``tmp_path``."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(eval_json()))
    (tmp_path / "metrics" / "compress.json").write_text(json.dumps({
        "n_tasks": 3, "bytes_experts": 300_000_000,
        "tall": {"bytes": 60e6, "bytes_with_base": 160e6, "ratio": 0.2, "ratio_with_base": 0.53},
        "twin": {"bytes": 130e6, "ratio": 0.43, "router_val_accuracy": 0.9},
    }))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "coefficients.csv").write_text(
        "method,scaling,val_mean_accuracy\nties,0.3,0.7\nties,1.0,0.8\n"
        "task_arithmetic,0.3,0.75\ntask_arithmetic,1.0,0.6\n"
    )
    (tmp_path / "artifacts" / "coefficients").mkdir(parents=True)
    for t in TASKS:
        d = tmp_path / "data" / "tasks" / t
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"sha256": {"train": "a" * 64, "test": "b" * 64}}))
    return tmp_path


def sections(rep) -> dict:
    return {s.id: s for s in rep.sections}


def section_html(rep, sid: str) -> str:
    return rep.html.split(f'<section id="{sid}">')[1].split("</section>")[0]


def table_row(html: str, table_id: str, model: str) -> list[str]:
    """The ``<td>`` contents of one model's row of a table, in column order."""
    table = html.split(f'id="{table_id}"')[1].split("</table>")[0]
    row = table.split(f'data-model="{model}"')[1].split("</tr>")[0]
    return re.findall(r"<td[^>]*>.*?</td>", row)


def test_full_report_has_every_section_and_no_notices(workspace):
    rep = build_report(workspace, history=EMPTY_HISTORY)
    s = sections(rep)
    assert [n for k, sec in s.items() for n in sec.notices if k != "lineage"] == []
    html = rep.html
    assert html.startswith("<!DOCTYPE html>")
    assert html.count('<tr class="kind-') == 6 * 2 + 5  # two tables + best merge vs 5 others
    assert re.search(r"https?://", re.sub(r'xmlns(:\w+)?="[^"]+"', "", html)) is None
    assert "<script" not in html and "<link" not in html  # self-contained, no network
    for fig in ("mean-normalized", "task-alpha", "task-beta", "task-gamma", "pareto", "scaling"):
        parse(rep.figures[fig])
        assert f'<figure class="fig" id="fig-{fig}"><svg class="chart"' in html
    assert "derived from metrics/compress.json" in section_html(rep, "pareto")
    assert "First run" in section_html(rep, "history")
    assert [r["model"] for r in rep.headline][:2] == ["expert", "base"]
    assert rep.headline[2]["alpha"] == 0.8
    assert rep.headline[2]["mean normalized 95% CI"].startswith("[0.89")


def test_tables_show_intervals_and_n_per_task(workspace):
    html = build_report(workspace, history=EMPTY_HISTORY).html
    head = html.split('id="accuracy-table"')[1].split("</thead>")[0]
    for t, n in N_TEST.items():
        assert f'{t}<span class="n">n = {n}</span>' in head
    ties = table_row(html, "accuracy-table", "ties")
    assert ties[1] == '<td>0.850<span class="ci">[0.830, 0.870]</span></td>'  # alpha
    mean = summary_row(ACCURACY["ties"])["mean_accuracy"]
    assert ties[-1] == f'<td>{mean:.3f}<span class="ci">[{mean - 0.01:.3f}, {mean + 0.01:.3f}]</span></td>'
    norm = table_row(html, "normalized-table", "ties")
    assert norm[1] == f"<td>{0.85 / 0.9:.3f}</td>"  # per-task normalized: no interval of its own


def test_best_per_column_is_only_claimed_beyond_noise(workspace):
    html = build_report(workspace, history=EMPTY_HISTORY).html

    def marks(table: str, model: str) -> list[str]:
        return [re.match(r'<td(?: class="(\w+)")?>', c).group(1) or ""
                for c in table_row(html, table, model)[1:]]  # skip the kind column

    # alpha: tall_masks 0.88 vs twin 0.87 ±0.02 → tied; ties 0.85 is told apart.
    # beta, gamma and mean accuracy: tall_masks clearly ahead (0.04, 0.03 and 0.033 apart).
    assert marks("accuracy-table", "tall_masks") == ["tie", "best", "best", "best"]
    assert marks("accuracy-table", "twin_merging") == ["tie", "", "", ""]
    assert marks("accuracy-table", "ties") == ["", "", "", ""]
    assert marks("accuracy-table", "expert") == ["", "", "", ""]  # the reference never competes
    # mean normalized: tall_masks vs twin_merging is within noise by the paired interval
    assert marks("normalized-table", "tall_masks") == ["tie", "best", "best", "tie"]
    assert marks("normalized-table", "twin_merging") == ["tie", "", "", "tie"]
    tie_cell = table_row(html, "accuracy-table", "twin_merging")[1]
    assert '<span class="mark" title="within noise of the best in this column">≈</span>' in tie_cell


def test_best_merge_against_every_other_method_says_within_noise_where_it_is(workspace):
    rep = build_report(workspace, history=EMPTY_HISTORY)
    table = rep.html.split('id="noise-table"')[1].split("</table>")[0]
    assert "Best merge <strong>task_arithmetic</strong>" in table
    verdicts = dict(re.findall(r'data-model="(\w+)".*?<td class="verdict[^"]*">([^<]+)</td>',
                               table, flags=re.S))
    assert verdicts == {"expert": "expert better", "tall_masks": "tall_masks better",
                        "twin_merging": "twin_merging better", "ties": "within noise",
                        "base": "task_arithmetic better"}
    assert table.count("within noise</td>") == 1
    ev = eval_json()
    p = ev["task_arithmetic"]["paired"]["ties"]
    ties = table.split('data-model="ties"')[1].split("</tr>")[0]
    assert f"<td>{p['diff']:+.3f}</td><td>[{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]</td>" in ties
    # rows by mean normalized, best first
    order = re.findall(r'data-model="(\w+)"', table)
    assert order == ["expert", "tall_masks", "twin_merging", "ties", "base"]


def test_bar_charts_carry_the_files_intervals(workspace):
    rep = build_report(workspace, history=EMPTY_HISTORY)
    task = parse(rep.figures["task-beta"])
    # bar i = row i of the tables (expert, base, task_arithmetic, ties, tall_masks, twin_merging)
    assert tooltip(task, "task-beta-bar3") == "ties: 0.600 [0.580, 0.620], n=150"
    assert "beta: test accuracy (n = 150)" in texts(task)
    mean = parse(rep.figures["mean-normalized"])
    s = summary_row(ACCURACY["tall_masks"])
    lo, hi = s["mean_normalized_ci"]
    assert tooltip(mean, "mean-normalized-bar4") == (
        f"tall_masks: {s['mean_normalized']:.3f} [{lo:.3f}, {hi:.3f}]")


def test_an_eval_json_without_intervals_still_renders(workspace):
    old = {r: {k: v for k, v in s.items() if k in ("accuracy", "normalized", "mean_accuracy",
                                                   "mean_normalized")}
           for r, s in eval_json().items()}
    (workspace / "metrics" / "eval.json").write_text(json.dumps(old))
    rep = build_report(workspace, history=EMPTY_HISTORY)
    assert not sections(rep)["accuracy"].notices
    html = rep.html
    assert 'class="ci"' not in html and 'id="noise-table"' not in html
    assert "has no confidence intervals" in section_html(rep, "accuracy")
    alpha = table_row(html, "accuracy-table", "tall_masks")[1]
    assert alpha == '<td class="best">0.880</td>'  # no intervals: the top value, unqualified
    assert 'id="task-alpha-errors"' not in rep.figures["task-alpha"]  # no error bars


def test_malformed_intervals_are_dropped_and_noted(workspace):
    data = eval_json()
    data["ties"]["accuracy_ci"]["alpha"] = [0.9, 0.1]  # lo > hi
    data["ties"]["mean_normalized_ci"] = "wide"
    (workspace / "metrics" / "eval.json").write_text(json.dumps(data))
    rep = build_report(workspace, history=EMPTY_HISTORY)
    notes = sections(rep)["accuracy"].notices
    assert [n.what for n in notes] == ["metrics/eval.json: rows ties"]
    assert table_row(rep.html, "accuracy-table", "ties")[1] == "<td>0.850</td>"
    assert table_row(rep.html, "accuracy-table", "ties")[2].startswith("<td>0.600<span")


def test_two_builds_are_byte_identical(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = write_report(workspace, tmp_path / "a.html", history=EMPTY_HISTORY,
                     figures_dir=tmp_path / "figs")
    b = build_report(workspace, history=EMPTY_HISTORY)
    assert a.html == b.html and a.figures == b.figures
    assert "generated 2023-11-14 22:13 UTC" in a.html
    files = sorted(p.name for p in (tmp_path / "figs").glob("*.svg"))
    assert files == sorted(f"{k}.svg" for k in a.figures)
    assert (tmp_path / "figs" / "pareto.svg").read_text() == a.figures["pareto"]


def test_text_from_the_inputs_is_escaped(workspace):
    data = eval_json()
    data["<b>x</b>"] = data.pop("ties")
    (workspace / "metrics" / "eval.json").write_text(json.dumps(data))
    rep = build_report(workspace, status=("failed", "<i>boom</i>"), history=EMPTY_HISTORY)
    assert "<b>x</b>" not in rep.html and "&lt;b&gt;x&lt;/b&gt;" in rep.html
    assert "<i>boom</i>" not in rep.html and "&lt;i&gt;boom&lt;/i&gt;" in rep.html
    assert "&lt;b&gt;x&lt;/b&gt;" in rep.figures["task-alpha"]
    parse(rep.figures["task-alpha"])


def test_pareto_prefers_plots_pareto_csv(workspace):
    (workspace / "plots" / "pareto.csv").write_text(
        "form,setting,n_tasks,bytes,bytes_ratio,mean_accuracy,mean_normalized\n"
        "tall_masks,lambda=0.4,3,160000000,0.53,0.86,0.98\n"
        "tall_masks,lambda=0.6,3,150000000,0.5,0.8,0.9\n"
        "experts,,3,300000000,1.0,0.88,1.0\n"
    )
    rep = build_report(workspace, history=EMPTY_HISTORY)
    assert "plots/pareto.csv" in section_html(rep, "pareto")
    root = parse(rep.figures["pareto"])
    assert [tooltip(root, f"pareto-pt{i}").split(":")[0] for i in range(3)] == [
        "tall_masks (lambda=0.4)", "tall_masks (lambda=0.6)", "experts"]
    assert "tall_masks · lambda=0.4" in texts(root)  # several points per form: labelled by setting
    dot = group(root, "pareto-pt2").find(f".//{NS}use")
    assert f"fill: {charts.FIXED['expert']}" in dot.get("style")  # its eval row's colour
    (workspace / "metrics" / "eval.json").unlink()  # pareto.csv alone still plots
    rep = build_report(workspace, history=EMPTY_HISTORY)
    assert "pareto" in rep.figures and sections(rep)["accuracy"].notices


def test_missing_metrics_give_notices_not_a_crash(workspace, tmp_path):
    (workspace / "metrics" / "eval.json").unlink()
    (workspace / "metrics" / "compress.json").write_text("{not json")
    out = tmp_path / "out" / "index.html"
    rep = write_report(workspace, out, history=EMPTY_HISTORY)
    html = out.read_text()
    assert html == rep.html
    s = sections(rep)
    assert any(n.what == "metrics/eval.json" and "not found" in n.why for n in s["accuracy"].notices)
    assert s["per-task"].notices and s["pareto"].notices
    assert 'data-missing="metrics/eval.json"' in html
    assert "<code>dvc repro evaluate</code>" in html
    assert "input(s) missing or unusable" in html
    assert "scaling" in rep.figures  # what exists is still shown


def test_empty_workspace_and_failed_flow_status(tmp_path):
    rep = build_report(tmp_path, status=("failed", "stage evaluate failed (exit 1)"),
                       history=EMPTY_HISTORY)
    html = rep.html
    assert '<div class="status failed">stage evaluate failed (exit 1)</div>' in html
    for sec in rep.sections:
        if sec.id != "history":
            assert sec.notices, f"section {sec.id} should say what is missing"
    assert rep.headline == [] and rep.figures == {}
    assert "dvc.lock" in html and "First run" in html


def test_malformed_eval_rows_are_reported(workspace):
    data = eval_json()
    data["broken"] = {"mean_accuracy": 0.5}
    data["ties"]["accuracy"]["alpha"] = float("nan")  # e.g. an expert with accuracy 0
    data["ties"]["mean_normalized"] = float("nan")
    (workspace / "metrics" / "eval.json").write_text(json.dumps(data))
    rep = build_report(workspace, history=EMPTY_HISTORY)
    notes = sections(rep)["accuracy"].notices
    assert any("broken" in n.what for n in notes)
    assert 'data-model="broken"' not in rep.html
    assert table_row(rep.html, "accuracy-table", "ties")[1].startswith("<td>–")
    assert tooltip(parse(rep.figures["task-alpha"]), "task-alpha-bar3") == "ties: n/a"
    assert "n/a" in texts(parse(rep.figures["mean-normalized"]))


def test_incomplete_stages_and_stale_metrics_from_dvc_lock(workspace):
    (workspace / "dvc.yaml").write_text(
        "stages:\n  prepare:\n    foreach: ${tasks}\n    do:\n      cmd: x\n"
        "  evaluate:\n    cmd: y\n"
    )
    (workspace / "params.yaml").write_text("tasks: [alpha, beta]\n")
    (workspace / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare@alpha:\n    cmd: x\n  evaluate:\n    cmd: y\n"
        "    outs:\n    - path: metrics/eval.json\n      md5: 0123456789abcdef0123456789abcdef\n"
    )
    rep = build_report(workspace, history=EMPTY_HISTORY)
    whats = " ".join(n.what + " " + n.why for n in sections(rep)["lineage"].notices)
    assert "prepare@beta" in whats and "prepare@alpha" not in whats
    assert "differs from the md5 dvc.lock recorded" in whats
    lineage = section_html(rep, "lineage")
    assert "<code>metrics/eval.json</code> <code class=\"h\">0123456789abcdef" in lineage
    assert "<strong>task_arithmetic</strong> (mean normalized 0.904, 95 % interval [0.894, 0.914])" \
        in lineage


def test_unreachable_mlflow_is_a_notice(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    rep = build_report(workspace)
    notes = sections(rep)["history"].notices
    assert len(notes) == 1 and "unreachable" in notes[0].why


def test_no_local_store_means_first_run_and_creates_nothing(workspace, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    rep = build_report(workspace)
    assert "First run" in section_html(rep, "history")
    assert not (workspace / "mlflow.db").exists()


def test_tracking_off_is_a_notice(workspace, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    rep = build_report(workspace)
    assert "tracking is off" in sections(rep)["history"].notices[0].why


def fake_history(n_runs: int) -> dict:
    evals, versions = [], []
    for i in range(n_runs):
        evals.append({
            "run_id": f"eval{i}", "status": "FINISHED", "start_time": 1_700_000_000_000 + i * 8.64e7,
            "parent_run_id": f"flow{i}", "tags": {},
            "metrics": {"ties.mean_normalized": 0.8 + 0.01 * i, "tall_masks.mean_normalized": 0.99,
                        "expert.mean_normalized": 1.0, "task_arithmetic.mean_normalized": 0.7},
        })
        versions.append({"version": i + 1, "run_id": f"flow{i}", "created": 0,
                         "tags": {"mean_normalized": str(0.8 + 0.01 * i),
                                  "promoted": "true" if i % 2 == 0 else "false"}})
    evals.append({"run_id": "failed", "status": "FAILED", "start_time": 1, "parent_run_id": "",
                  "tags": {}, "metrics": {}})
    return {"uri": "http://mlflow:5000", "experiment_id": "1", "evaluations": evals, "flows": {},
            "versions": versions, "aliases": {"champion": 3, "candidate": 4}}


def test_history_series_best_merge_ignores_references_and_compressions():
    series, labels, rows = history_series(fake_history(4))
    assert len(labels) == 4  # the failed run is left out
    assert series["best merge per run"] == [(float(i), pytest.approx(0.8 + 0.01 * i))
                                            for i in range(4)]
    assert [x for x, _ in series["champion (registered model)"]] == [0.0, 2.0]
    assert rows[0]["best"][0] == "ties"


def test_history_section_renders_chart_and_links(workspace):
    rep = build_report(workspace, history=fake_history(4))
    sec = section_html(rep, "history")
    assert "history" in rep.figures and not sections(rep)["history"].notices
    assert "mergeflow-merged v3" in sec
    assert '<a href="http://mlflow:5000/#/experiments/1/runs/flow3"><code>flow3</code></a>' in sec
    root = parse(rep.figures["history"])
    assert tooltip(root, "history-series0") == "best merge per run: 0.800, 0.810, 0.820, 0.830"
    assert tooltip(root, "history-series2") == "champion (registered model): 0.800, 0.820"
    assert tick_labels(root, "x") == ["11-14 22:13", "11-15 22:13", "11-16 22:13", "11-17 22:13"]


def test_single_run_history_says_first_run_on_a_readable_axis(workspace):
    rep = build_report(workspace, history=fake_history(1))
    assert "First run" in section_html(rep, "history")
    root = parse(rep.figures["history"])
    ys = tick_labels(root, "y")
    assert len(ys) >= 3 and len(set(ys)) == len(ys) and all(len(y) <= 5 for y in ys), ys
    assert tick_labels(root, "x") == ["11-14 22:13"]


def test_learned_coefficient_heatmaps(workspace):
    import torch

    from mergeflow.coefficients import BlockScheme, FunctionalMerge, save_learned

    base = {
        "embeddings.word.weight": torch.zeros(4, 2),
        "encoder.layer.0.attention.q.weight": torch.zeros(2, 2),
        "encoder.layer.0.output.weight": torch.zeros(2, 2),
        "encoder.layer.1.output.weight": torch.zeros(2, 2),
    }
    tvs = {t: {k: torch.ones_like(v) for k, v in base.items()} for t in TASKS}
    fm = FunctionalMerge(base, tvs, BlockScheme("layer"))
    per_key = dict(zip(base, ([0.1, 1, 0], [0.2, 1, 0], [0.4, 1, 0], [0.5, 1, 0.3]), strict=True))
    alpha = torch.tensor([[per_key[k][i] for k in fm.keys] for i in range(len(TASKS))])
    d = workspace / "artifacts" / "coefficients"
    save_learned(d / "ada.safetensors", fm, alpha)
    (d / "ada.json").write_text(json.dumps({"config": {"method": "adamerging"}}))
    (d / "junk.safetensors").write_bytes(b"not safetensors")
    rep = build_report(workspace, history=EMPTY_HISTORY)
    sec = sections(rep)["coefficients"]
    root = parse(rep.figures["alpha-ada"])
    assert len(list(group(root, "alpha-ada-cells").iter(f"{NS}path"))) == 3 * 3
    words = texts(root)
    assert {"emb", "L0", "L1", "alpha", "beta", "gamma"} <= set(words)
    # row alpha: emb 0.1, L0 averages its two tensors (0.2 + 0.4) / 2, L1 0.5
    assert words[words.index("0.10"):words.index("0.10") + 3] == ["0.10", "0.30", "0.50"]
    assert [n.what for n in sec.notices] == ["artifacts/coefficients/junk.safetensors"]
    assert '<figure class="fig" id="fig-alpha-ada">' in section_html(rep, "coefficients")


@pytest.mark.slow
def test_history_and_lineage_from_a_real_local_mlflow_store(workspace, monkeypatch):
    """run_history's queries against a real MLflow store: runs, registry, aliases, report links."""
    from mergeflow import tracking

    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    assert tracking.run_history(workspace)["evaluations"] == []  # no store yet: nothing, no file
    assert not (workspace / "mlflow.db").exists()
    model = workspace / "model"
    model.mkdir()
    (model / "merge.json").write_text("{}")
    from mlflow import MlflowClient

    from mergeflow.io import tree_md5

    client = MlflowClient(tracking_uri=tracking.tracking_uri(workspace))
    versions = []
    for score in (0.9, 0.85):
        with tracking.flow_run("flow", workspace) as parent:
            # the evaluate stage's run as stage_run logs it from its own process, nested
            exp = client.get_run(parent.run_id).info.experiment_id
            child = client.create_run(exp, run_name="evaluate", tags={
                "mergeflow.stage": "evaluate", "mlflow.parentRunId": parent.run_id,
                "output.metrics.md5": tree_md5(workspace / "metrics" / "eval.json"),
            })
            client.log_metric(child.info.run_id, "ties.mean_normalized", score)
            client.log_metric(child.info.run_id, "tall_masks.mean_normalized", 0.99)
            client.set_terminated(child.info.run_id)
            versions.append(tracking.register_candidate(parent, model, "mergeflow-merged", score))
            parent.log_files([workspace / "metrics" / "eval.json"], "report")
    hist = tracking.run_history(workspace)
    assert [e["metrics"]["ties.mean_normalized"] for e in hist["evaluations"]] == [0.9, 0.85]
    assert [v["version"] for v in hist["versions"]] == [1, 2]
    assert hist["aliases"] == {"champion": 1, "candidate": 2}  # 0.85 < 0.9: not promoted
    assert set(hist["flows"]) == {v.run_id for v in versions}
    series, _, _ = history_series(hist)
    assert [y for _, y in series["champion (registered model)"]] == [0.9]
    assert [y for _, y in series["registered version"]] == [0.9, 0.85]

    rep = build_report(workspace)
    assert "history" in rep.figures
    assert "mergeflow-merged v1</strong>" in section_html(rep, "history")
    lineage = section_html(rep, "lineage")
    assert "registered as <strong>mergeflow-merged v2</strong>" in lineage  # matched by md5
    assert [a.path for a in client.list_artifacts(versions[0].run_id, "report")] == [
        "report/eval.json"
    ]
