"""Stage ``evaluate``: test accuracy per task of experts, base, each merge and TALL reconstructions.

Normalized accuracy = accuracy / the task's individual expert accuracy (FusionBench / TALL papers).
Scalings come from the coefficients stage (chosen on validation; test is never used for tuning).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from mergeflow import compression, methods
from mergeflow.coefficients import rebuild
from mergeflow.compression import twin
from mergeflow.config import Params
from mergeflow.io import write_bytes_atomic, write_json_atomic
from mergeflow.pipeline.artifacts import expert_prefix, experts_from_vectors, load_expert
from mergeflow.pipeline.context import MergeContext
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    data: Path
    base: Path
    experts: Path
    task_vectors: Path
    coefficients: Path
    compressed: Path
    twin: Path
    metrics: Path
    plot: Path
    report: Path


def summarize(per_task: dict[str, dict[str, float]], expert: dict[str, float]) -> dict:
    """Absolute and normalized accuracy per task and their means, per row (method)."""
    out = {}
    for row, accs in per_task.items():
        norm = {t: (a / expert[t] if expert[t] > 0 else float("nan")) for t, a in accs.items()}
        out[row] = {
            "mean_accuracy": sum(accs.values()) / len(accs),
            "mean_normalized": sum(norm.values()) / len(norm),
            "accuracy": accs,
            "normalized": norm,
        }
    return out


def markdown_table(summary: dict, tasks: list[str]) -> str:
    """A markdown table: one row per model, accuracy per task, mean absolute and normalized."""
    head = "| model | " + " | ".join(tasks) + " | mean acc | mean normalized |\n"
    head += "|---" * (len(tasks) + 3) + "|\n"
    lines = [
        f"| {row} | "
        + " | ".join(f"{s['accuracy'][t]:.3f}" for t in tasks)
        + f" | {s['mean_accuracy']:.3f} | {s['mean_normalized']:.3f} |"
        for row, s in summary.items()
    ]
    return head + "\n".join(lines) + "\n"


def run(cfg: Params, paths: Paths) -> dict:
    """Score every model on every task's test split; write metrics, plot data and a report."""
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    test = ctx.batches(paths.data, "test")
    coef = json.loads((Path(paths.coefficients) / "coefficients.json").read_text())
    rows: dict[str, dict[str, float]] = {"expert": {}, "tall_masks": {}}
    for t in ctx.tasks:
        d = Path(paths.experts) / t
        rows["expert"][t] = ctx.score(load_expert(d, expert_prefix(d))[0], test, [t])[t]
        tall = compression.load(paths.compressed, t, base=paths.base)[0]
        rows["tall_masks"][t] = ctx.score(tall, test, [t])[t]
    rows["base"] = ctx.score(ctx.base, test)
    twin_model = twin.TwinModel(paths.twin)
    twin_scores = ctx.score_twin(twin_model, test, twin_model.manifest.get("routing", "top1"))
    rows["twin_merging"] = twin_scores["accuracy"]
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    for name, c in coef.items():
        if "learned" in c:  # learned coefficients (AdaMerging, aTLAS, Concrete): re-apply α
            merged = rebuild(ctx.base, ctx.task_vectors, Path(paths.coefficients) / c["learned"])
        else:
            merged = methods.merge(
                name, ctx.base, experts, scaling=c["scaling"], **c["hyperparams"]
            )
        rows[name] = ctx.score(merged, test)
    summary = summarize(rows, rows["expert"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["model", "task", "accuracy", "normalized"])
    w.writeheader()
    for row, s in summary.items():
        for t in ctx.tasks:
            w.writerow(
                {
                    "model": row,
                    "task": t,
                    "accuracy": round(s["accuracy"][t], 4),
                    "normalized": round(s["normalized"][t], 4),
                }
            )
    report = (
        f"# mergeflow evaluation\n\nTest accuracy per task ({len(ctx.tasks)} tasks; "
        f"scalings chosen on validation: "
        + ", ".join(f"{m} λ={c['scaling']}" for m, c in coef.items())
        + ").\n\n"
        + markdown_table(summary, ctx.tasks)
    )
    with stage_run(
        "evaluate",
        {"tasks": ctx.tasks, "coefficients": coef},
        inputs={
            "coefficients": paths.coefficients,
            "compressed": paths.compressed,
            "twin": paths.twin,
            "test": paths.data,
        },
    ) as tr:
        tr.dataset("test", "-", str(paths.data), "test: final evaluation only")
        tr.metrics({"twin_merging.routing_accuracy": twin_scores["routing_accuracy"]})
        write_json_atomic(paths.metrics, summary)
        write_bytes_atomic(paths.plot, buf.getvalue().encode())
        write_bytes_atomic(paths.report, report.encode())
        for row, s in summary.items():
            tr.metrics(
                {
                    f"{row}.mean_accuracy": s["mean_accuracy"],
                    f"{row}.mean_normalized": s["mean_normalized"],
                }
            )
        tr.artifact(paths.report)
        tr.outputs({"metrics": paths.metrics})
    return summary
