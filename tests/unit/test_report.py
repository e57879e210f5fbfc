"""The dashboard: SVG chart builders and the report's behaviour on missing / bad inputs."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mergeflow.report import build_report, svg, write_report
from mergeflow.report.build import history_series

NS = "{http://www.w3.org/2000/svg}"
TASKS = ["alpha", "beta", "gamma"]
EMPTY_HISTORY = {"uri": "sqlite:///x/mlflow.db", "experiment_id": "", "evaluations": [],
                 "flows": {}, "versions": [], "aliases": {}}


def parse(chart: str) -> ET.Element:
    """Parse an SVG string (fails the test if it is not well-formed XML)."""
    return ET.fromstring(chart)


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{NS}text")]


# --- SVG builders ------------------------------------------------------------------------------


def test_nice_ticks_cover_range_with_round_steps():
    assert svg.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    t = svg.nice_ticks(0.37, 0.93)
    assert t[0] <= 0.37 and t[-1] >= 0.93
    steps = {round(b - a, 9) for a, b in zip(t, t[1:], strict=False)}
    assert len(steps) == 1 and steps.pop() in (0.1, 0.2, 0.05, 0.25)
    assert svg.nice_ticks(5, 5)[0] < 5 < svg.nice_ticks(5, 5)[-1]  # degenerate range padded
    with pytest.raises(ValueError):
        svg.nice_ticks(0, math.inf)


def test_pareto_front_keeps_only_undominated_points_in_x_order():
    pts = [(100, 0.9), (50, 0.8), (50, 0.7), (200, 0.95), (150, 0.85), (10, 0.5)]
    assert svg.pareto_front(pts) == [5, 1, 0, 3]
    assert svg.pareto_front([]) == []
    assert svg.pareto_front([(1, 1)]) == [0]


def test_palette_is_stable_and_distinct():
    p = svg.Palette(["expert", "ties", "task_arithmetic", "base"])
    assert p("expert") == svg.FIXED["expert"] and p("base") == svg.FIXED["base"]
    assert p("ties") != p("task_arithmetic")
    assert p("ties") == svg.Palette(["expert", "ties"])("ties")  # same order, same colour
    assert len(set(p.mapping().values())) == 4


def test_bar_chart_one_bar_per_value_heights_proportional_and_labelled():
    chart = svg.bar_chart(
        "Accuracy", ["a", "b"], {"m1": [0.5, 1.0], "m2": [0.25, None]},
        colors={"m1": "#111111", "m2": "#222222"}, x_label="task", y_label="accuracy (fraction)",
        value_range=(0.0, 1.0),
    )
    root = parse(chart)
    bars = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert len(bars) == 3  # the None value draws no bar
    h = {b.find(f"{NS}title").text: float(b.get("height")) for b in bars}
    assert h["a · m1: 0.500"] == pytest.approx(h["b · m1: 1.000"] / 2, rel=0.02)
    assert h["a · m2: 0.250"] == pytest.approx(h["b · m1: 1.000"] / 4, rel=0.02)
    assert {b.get("fill") for b in bars} == {"#111111", "#222222"}
    words = texts(root)
    assert "Accuracy" in words and "task" in words and "accuracy (fraction)" in words
    assert "m1" in words and "m2" in words and "n/a" in words  # legend + missing marker
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        svg.bar_chart("x", ["a", "b", "c"], {"m": [1, 2]}, colors={})


def test_bar_chart_colour_by_category_and_reference_line():
    chart = svg.bar_chart("t", ["x", "y"], {"acc": [0.3, 0.6]}, colors={"x": "#aa0000",
                          "y": "#00aa00"}, color_by="category", reference=0.5,
                          reference_label="expert")
    root = parse(chart)
    fills = [r.get("fill") for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert fills == ["#aa0000", "#00aa00"]
    assert "expert" in texts(root)
    assert any(ln.get("stroke-dasharray") for ln in root.iter(f"{NS}line"))


def test_scatter_draws_points_and_the_pareto_front_through_undominated_points():
    pts = [svg.Point("experts", 300, 1.0), svg.Point("ties", 100, 0.8),
           svg.Point("base", 100, 0.5), svg.Point("tall", 160, 0.97)]
    root = parse(svg.scatter_chart("P", pts, colors=svg.Palette(), x_label="MB", y_label="acc"))
    circles = [c for c in root.iter(f"{NS}circle") if c.get("class") == "point"]
    assert len(circles) == 4
    front = [p for p in root.iter(f"{NS}path") if p.get("class") == "pareto-front"]
    assert len(front) == 1
    # the staircase rises to each of the 3 front points, then runs on to the right edge
    d = front[0].get("d")
    assert d.count("V") == 3 and d.count("H") == 4
    ringed = [c.find(f"{NS}title").text.split(":")[0] for c in circles
              if c.get("stroke") == svg.INK]
    assert sorted(ringed) == ["experts", "tall", "ties"]
    with pytest.raises(ValueError, match="log_x"):
        svg.scatter_chart("P", [svg.Point("a", 0, 1)], colors={}, x_label="", y_label="",
                          log_x=True)


def test_scatter_labels_in_a_crowded_column_do_not_overlap():
    pts = [svg.Point(f"method_{i}", 100, 0.9 + 0.002 * i) for i in range(12)]
    pts += [svg.Point("experts", 800, 1.0)]
    root = parse(svg.scatter_chart("P", pts, colors=svg.Palette(), x_label="MB", y_label="acc"))
    boxes = []
    for t in root.iter(f"{NS}text"):
        if t.get("class") == "point-label":
            x, y = float(t.get("x")), float(t.get("y"))
            boxes.append((x, y - 10, x + len(t.text) * 10.5 * 0.58, y + 2))
    assert len(boxes) >= 8  # most are placed; the rest left to legend and tooltip
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    # a front of one point (a merge that beats every bigger form) is still drawn
    one = parse(svg.scatter_chart("P", [svg.Point("m", 1, 2.0), svg.Point("e", 3, 1.0)],
                                  colors={}, x_label="", y_label=""))
    assert [p.get("d").count("V") for p in one.iter(f"{NS}path")] == [1]


def test_heatmap_cells_colour_from_min_to_max():
    root = parse(svg.heatmap("H", ["t1", "t2"], ["L0", "L1", "L2"],
                             [[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]], x_label="layer",
                             value_label="α"))
    cells = [r for r in root.iter(f"{NS}rect") if r.get("class") == "cell"]
    assert len(cells) == 6
    assert cells[0].get("fill") == "#440154" and cells[2].get("fill") == "#fde725"
    with pytest.raises(ValueError, match="2 × 3"):
        svg.heatmap("H", ["t1", "t2"], ["a", "b", "c"], [[1, 2, 3]])
    # (nearly) constant values get one mid colour, not the full dark-to-yellow contrast
    flat = parse(svg.heatmap("H", ["t"], ["a", "b"], [[0.5, 0.50001]]))
    fills = {r.get("fill") for r in flat.iter(f"{NS}rect") if r.get("class") == "cell"}
    assert len(fills) == 1 and fills != {"#440154"} and fills != {"#fde725"}


def test_line_chart_series_and_step():
    root = parse(svg.line_chart("L", {"a": [(2, 0.5), (0, 0.4), (1, 0.45)], "b": [(1, 0.6)]},
                                colors={"a": "#123456", "b": "#654321"}, x_label="run",
                                y_label="acc", step=("b",)))
    paths = [p for p in root.iter(f"{NS}path") if p.get("class") == "line"]
    assert [p.get("stroke") for p in paths] == ["#123456", "#654321"]
    xs = [float(v) for v in re.findall(r"[ML]([\d.]+),", paths[0].get("d"))]
    assert xs == sorted(xs)  # sorted by x
    assert "H" in paths[1].get("d")  # the step series runs on to the right edge
    assert len([c for c in root.iter(f"{NS}circle")]) == 4


def test_text_is_escaped():
    chart = svg.bar_chart("<b>&", ["<x>"], {"s": [1.0]}, colors={})
    assert "<b>" not in chart and "&lt;b&gt;&amp;" in chart
    parse(chart)


# --- the report on fabricated workspaces -------------------------------------------------------


def summary_row(accs: dict[str, float], expert: dict[str, float]) -> dict:
    norm = {t: a / expert[t] for t, a in accs.items()}
    return {"accuracy": accs, "normalized": norm, "mean_accuracy": sum(accs.values()) / len(accs),
            "mean_normalized": sum(norm.values()) / len(norm)}


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A workspace with every input the report reads (small, fabricated)."""
    return fabricate(tmp_path)


def fabricate(tmp_path: Path) -> Path:
    """Write fabricated metrics, plots and task metadata into ``tmp_path``."""
    expert = {"alpha": 0.9, "beta": 0.8, "gamma": 0.95}
    rows = {
        "expert": expert,
        "base": {"alpha": 0.5, "beta": 0.3, "gamma": 0.2},
        "task_arithmetic": {"alpha": 0.8, "beta": 0.7, "gamma": 0.9},
        "ties": {"alpha": 0.85, "beta": 0.6, "gamma": 0.92},
        "tall_masks": {"alpha": 0.88, "beta": 0.79, "gamma": 0.95},
        "twin_merging": {"alpha": 0.87, "beta": 0.75, "gamma": 0.9},
    }
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(
        json.dumps({r: summary_row(a, expert) for r, a in rows.items()})
    )
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


def test_full_report_has_every_section_and_no_notices(workspace):
    rep = build_report(workspace, history=EMPTY_HISTORY)
    s = sections(rep)
    assert [n for k, sec in s.items() for n in sec.notices if k != "lineage"] == []
    html = rep.html
    assert html.count('<tr class="kind-') == 6 * 2 + 0  # both tables: one row per model
    assert re.search(r"https?://", html.replace("http://www.w3.org/2000/svg", "")) is None
    assert "<script" not in html and "<link" not in html  # self-contained, no network
    for fig in ("mean-normalized", "task-alpha", "task-beta", "task-gamma", "pareto", "scaling"):
        assert fig in rep.figures
        parse(rep.figures[fig])
    # best per column: highest non-expert value, e.g. alpha → tall_masks 0.88
    acc_table = html.split('id="accuracy-table"')[1].split("</table>")[0]
    tall = acc_table.split('data-model="tall_masks"')[1].split("</tr>")[0]
    assert '<td class="best">0.880</td>' in tall
    expert = acc_table.split('data-model="expert"')[1].split("</tr>")[0]
    assert 'class="best"' not in expert
    assert "derived from metrics/compress.json" in s["pareto"].intro
    assert "First run" in s["history"].body
    assert [r["model"] for r in rep.headline][:2] == ["expert", "base"]
    assert rep.headline[2]["alpha"] == 0.8


def test_pareto_prefers_plots_pareto_csv(workspace):
    (workspace / "plots" / "pareto.csv").write_text(
        "form,setting,n_tasks,bytes,bytes_ratio,mean_accuracy,mean_normalized\n"
        "tall_masks,lambda=0.4,3,160000000,0.53,0.86,0.98\n"
        "tall_masks,lambda=0.6,3,150000000,0.5,0.8,0.9\n"
        "experts,,3,300000000,1.0,0.88,1.0\n"
    )
    rep = build_report(workspace, history=EMPTY_HISTORY)
    assert "plots/pareto.csv" in sections(rep)["pareto"].intro
    assert len(re.findall(r'class="point"', rep.figures["pareto"])) == 3
    assert ">lambda=0.4<" in rep.figures["pareto"]  # several points per form: labelled by setting
    experts = [c for c in parse(rep.figures["pareto"]).iter(f"{NS}circle")
               if c.find(f"{NS}title").text.startswith("experts")]
    assert experts[0].get("fill") == svg.FIXED["expert"]  # the form in its eval row's colour
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
    assert "dvc repro evaluate" in html
    assert "input(s) missing or unusable" in html
    assert "scaling" in rep.figures  # what exists is still shown


def test_empty_workspace_and_failed_flow_status(tmp_path):
    rep = build_report(tmp_path, status=("failed", "stage evaluate failed (exit 1)"),
                       history=EMPTY_HISTORY)
    html = rep.html
    assert "stage evaluate failed (exit 1)" in html
    for sec in rep.sections:
        if sec.id != "history":
            assert sec.notices, f"section {sec.id} should say what is missing"
    assert rep.headline == [] and rep.figures == {}
    assert "dvc.lock" in html and "First run" in html


def test_malformed_eval_rows_are_reported(workspace):
    data = json.loads((workspace / "metrics" / "eval.json").read_text())
    data["broken"] = {"mean_accuracy": 0.5}
    data["ties"]["accuracy"]["alpha"] = float("nan")  # e.g. an expert with accuracy 0
    data["ties"]["mean_normalized"] = float("nan")
    (workspace / "metrics" / "eval.json").write_text(json.dumps(data))
    rep = build_report(workspace, history=EMPTY_HISTORY)
    notes = sections(rep)["accuracy"].notices
    assert any("broken" in n.what for n in notes)
    assert 'data-model="broken"' not in rep.html
    ties = rep.html.split('id="accuracy-table"')[1].split('data-model="ties"')[1].split("</tr>")[0]
    assert "<td>–</td>" in ties
    assert "n/a" in rep.figures["task-alpha"] and "n/a" in rep.figures["mean-normalized"]


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


def test_unreachable_mlflow_is_a_notice(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    rep = build_report(workspace)
    notes = sections(rep)["history"].notices
    assert len(notes) == 1 and "unreachable" in notes[0].why


def test_no_local_store_means_first_run_and_creates_nothing(workspace, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    rep = build_report(workspace)
    assert "First run" in sections(rep)["history"].body
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
    sec = sections(rep)["history"]
    assert "history" in rep.figures and not sec.notices
    assert "mergeflow-merged v3" in sec.intro
    assert "http://mlflow:5000/#/experiments/1/runs/flow3" in sec.body
    root = parse(rep.figures["history"])
    assert len([c for c in root.iter(f"{NS}circle")]) == 4 + 4 + 2


def test_single_run_history_says_first_run(workspace):
    rep = build_report(workspace, history=fake_history(1))
    assert "First run" in sections(rep)["history"].intro


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
    assert "alpha-ada" in rep.figures
    root = parse(rep.figures["alpha-ada"])
    assert len([r for r in root.iter(f"{NS}rect") if r.get("class") == "cell"]) == 3 * 3
    assert {"emb", "L0", "L1"} <= set(texts(root))
    # layer L0 averages its two tensors: task alpha → (0.2 + 0.4) / 2
    assert any(t.endswith("alpha · L0: 0.300") for t in
               (c.find(f"{NS}title").text for c in root.iter(f"{NS}rect") if c.get("class") == "cell"))
    assert [n.what for n in sec.notices] == ["artifacts/coefficients/junk.safetensors"]


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
    assert "history" in rep.figures and "mergeflow-merged v1</strong>" in sections(rep)["history"].intro
    lineage = sections(rep)["lineage"].body
    assert "registered as <strong>mergeflow-merged v2</strong>" in lineage  # matched by md5
    assert [a.path for a in client.list_artifacts(versions[0].run_id, "report")] == [
        "report/eval.json"
    ]
