"""Stage ``evaluate``: test accuracy per task of experts, base, each merge and compressed form.

Normalized accuracy = accuracy / the task's individual expert accuracy (FusionBench / TALL papers).
Scalings come from the coefficients stage (chosen on validation; test is never used for tuning).
Accuracy per byte: ``plots/pareto.csv`` puts every stored form (experts, merged models, TALL,
TALL + consensus, Twin-Merging, LoRA-LEGO) at its bytes on disk from ``metrics/compress.json``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import compression, methods
from mergeflow.coefficients import rebuild
from mergeflow.compression import twin
from mergeflow.config import Params
from mergeflow.io import write_bytes_atomic, write_json_atomic
from mergeflow.models.lora import lora_delta, read_adapter
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
    tall_consensus: Path
    lora_lego: Path
    compress_metrics: Path
    metrics: Path
    plot: Path
    pareto: Path
    report: Path


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise the same state dict (then a forward pass of one serves for the other)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a
    )


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


PARETO_COLUMNS = (
    "form",
    "setting",
    "n_tasks",
    "bytes",
    "bytes_ratio",
    "mean_accuracy",
    "mean_normalized",
)


def pareto_rows(summary: dict, sizes: dict, coef: dict, n_tasks: int) -> list[dict]:
    """One row per stored form and knob: its bytes on disk and its mean (normalized) accuracy.

    Args:
        summary: :func:`summarize` output (rows ``expert``, ``base``, merges, compressed forms).
        sizes: ``metrics/compress.json`` of the compress stage.
        coef: ``coefficients.json`` (a merge row's setting is its method and λ).
        n_tasks: Number of tasks.

    Returns:
        Rows with :data:`PARETO_COLUMNS`; ``bytes_ratio`` = bytes / all experts' bytes.
    """
    experts = sizes["bytes_experts"]
    rows = []

    def add(form: str, setting: str, row: str, nbytes: int) -> None:
        if row in summary:
            s = summary[row]
            rows.append(
                {
                    "form": form,
                    "setting": setting,
                    "n_tasks": n_tasks,
                    "bytes": int(nbytes),
                    "bytes_ratio": round(nbytes / experts, 5),
                    "mean_accuracy": round(s["mean_accuracy"], 5),
                    "mean_normalized": round(s["mean_normalized"], 5),
                }
            )

    add("experts", "one fine-tuned model per task", "expert", experts)
    add("base", "pretrained encoder + heads", "base", sizes["bytes_merged"])
    for name, c in coef.items():
        if "learned" in c:
            setting = f"{name} (learned coefficients)"
        else:
            setting = f"{name} λ={c['scaling']}" if "scaling" in c else name
        add("merged", setting, name, sizes["bytes_merged"])
    for form, row in (("tall", "tall_masks"), ("tall_consensus", "tall_consensus")):
        if form in sizes:
            k = f"k={sizes[form]['k']}, " if "k" in sizes[form] else ""
            add(form, f"{k}θ0 by reference", row, sizes[form]["bytes"])
            add(form, f"{k}θ0 included", row, sizes[form]["bytes_with_base"])
    tw = sizes.get("twin", {})
    add("twin", f"rank {tw.get('rank', '?')}", "twin_merging", tw.get("bytes", 0))
    if "lora_lego" in sizes:
        add(
            "lora_lego",
            f"rank {sizes['lora_lego']['rank']}",
            "lora_lego",
            sizes["lora_lego"]["bytes"],
        )
    return rows


def pareto_markdown(rows: list[dict]) -> str:
    """The accuracy-per-byte table of the report, smallest forms first."""
    out = "| form | setting | MB | × experts | mean acc | mean normalized |\n"
    out += "|---|---|---:|---:|---:|---:|\n"
    for r in sorted(rows, key=lambda r: r["bytes"]):
        out += (
            f"| {r['form']} | {r['setting']} | {r['bytes'] / 1e6:.1f} | {r['bytes_ratio']:.3f} "
            f"| {r['mean_accuracy']:.3f} | {r['mean_normalized']:.3f} |\n"
        )
    return out


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
    cons_dir = Path(paths.tall_consensus) / "archive"
    if cons_dir.is_dir():
        rows["tall_consensus"] = {
            t: ctx.score(compression.load(cons_dir, t, base=paths.base)[0], test, [t])[t]
            for t in ctx.tasks
        }
    lego_dir = Path(paths.lora_lego) / "adapter"
    if lego_dir.is_dir():
        prefix = expert_prefix(Path(paths.experts) / ctx.tasks[0])
        delta = lora_delta(*read_adapter(lego_dir), prefix)
        rows["lora_lego"] = ctx.score(
            {
                k: (v.float() + delta[k]).to(v.dtype) if k in delta else v
                for k, v in ctx.base.items()
            },
            test,
        )
    rows["base"] = ctx.score(ctx.base, test)
    twin_model = twin.TwinModel(paths.twin)
    rows["twin_merging"] = {}  # scored below, with the router features of its shared merge's row
    twin_feats: dict | None = None
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    for name, c in coef.items():
        if "learned" in c:  # learned coefficients (AdaMerging, aTLAS, Concrete): re-apply α
            merged = rebuild(ctx.base, ctx.task_vectors, Path(paths.coefficients) / c["learned"])
        else:
            merged = methods.merge(
                name, ctx.base, experts, scaling=c["scaling"], **c["hyperparams"]
            )
        shared = twin_feats is None and same_weights(merged, twin_model.shared)
        feats: dict | None = {} if shared else None
        rows[name] = ctx.score(merged, test, features=feats)
        twin_feats = feats if shared else twin_feats
    twin_scores = ctx.score_twin(
        twin_model, test, twin_model.manifest.get("routing", "top1"), features=twin_feats
    )
    rows["twin_merging"] = twin_scores["accuracy"]
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
    sizes = json.loads(Path(paths.compress_metrics).read_text())
    pareto = pareto_rows(summary, sizes, coef, len(ctx.tasks))
    pbuf = io.StringIO()
    pw = csv.DictWriter(pbuf, fieldnames=list(PARETO_COLUMNS))
    pw.writeheader()
    pw.writerows(pareto)
    report = (
        f"# mergeflow evaluation\n\nTest accuracy per task ({len(ctx.tasks)} tasks; "
        f"scalings chosen on validation: "
        + ", ".join(f"{m} λ={c['scaling']}" for m, c in coef.items())
        + ").\n\n"
        + markdown_table(summary, ctx.tasks)
        + "\n## Accuracy per byte\n\nBytes on disk of each stored form against keeping every "
        f"expert ({sizes['bytes_experts'] / 1e6:.1f} MB for {len(ctx.tasks)} tasks; a merged model "
        f"is {sizes['bytes_merged'] / 1e6:.1f} MB). Plot: `dvc plots show plots/pareto.csv`.\n\n"
        + pareto_markdown(pareto)
    )
    with stage_run(
        "evaluate",
        {"tasks": ctx.tasks, "coefficients": coef},
        inputs={
            "coefficients": paths.coefficients,
            "compressed": paths.compressed,
            "twin": paths.twin,
            "tall_consensus": paths.tall_consensus,
            "lora_lego": paths.lora_lego,
            "test": paths.data,
        },
    ) as tr:
        tr.dataset("test", "-", str(paths.data), "test: final evaluation only")
        tr.metrics({"twin_merging.routing_accuracy": twin_scores["routing_accuracy"]})
        write_json_atomic(paths.metrics, summary)
        write_bytes_atomic(paths.plot, buf.getvalue().encode())
        write_bytes_atomic(paths.pareto, pbuf.getvalue().encode())
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
