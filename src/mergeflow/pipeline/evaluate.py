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

from mergeflow import compression, methods, stats
from mergeflow.coefficients import rebuild
from mergeflow.compression import twin
from mergeflow.config import Params
from mergeflow.data import read_meta
from mergeflow.io import write_bytes_atomic, write_json_atomic
from mergeflow.methods.params import check_config
from mergeflow.models.lora import lora_delta, read_adapter
from mergeflow.pipeline.artifacts import (
    expert_prefix,
    experts_from_vectors,
    load_expert,
    load_probe_head,
)
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


def summarize(
    correct: dict[str, dict[str, torch.Tensor]], *, samples: int = 2000, seed: int = 0
) -> dict:
    """Accuracy per task and its means per row (method), each with its 95 % interval.

    Args:
        correct: Row -> task -> per-text correctness, every row in the same text order; must
            hold an ``expert`` row (normalized accuracy = accuracy ÷ the task's expert's).
        samples: Bootstrap replicates (:func:`mergeflow.stats.bootstrap`).
        seed: Seed of the bootstrap.

    Returns:
        Row -> ``mean_accuracy``, ``mean_normalized``, ``accuracy`` and ``normalized`` per task,
        ``accuracy_ci`` (Wilson) and ``n_test`` per task, ``mean_accuracy_ci`` and
        ``mean_normalized_ci`` (bootstrap), and ``paired``: other row -> ``diff``, ``ci`` and
        ``within_noise`` of (this row's mean normalized − the other's) over the same texts.
    """
    boot = stats.bootstrap(correct, reference="expert", samples=samples, seed=seed)
    expert = {t: int(c.sum()) / c.numel() for t, c in correct["expert"].items()}
    out = {}
    for row, per_task in correct.items():
        n = {t: int(c.numel()) for t, c in per_task.items()}
        hits = {t: int(c.sum()) for t, c in per_task.items()}
        accs = {t: hits[t] / n[t] for t in per_task}
        norm = {t: (a / expert[t] if expert[t] > 0 else float("nan")) for t, a in accs.items()}
        out[row] = {
            "mean_accuracy": sum(accs.values()) / len(accs),
            "mean_normalized": sum(norm.values()) / len(norm),
            "accuracy": accs,
            "normalized": norm,
            "accuracy_ci": {t: list(stats.wilson(hits[t], n[t])) for t in per_task},
            "n_test": n,
            "mean_accuracy_ci": boot.interval(row),
            "mean_normalized_ci": boot.interval(row, normalized=True),
        }
    for row, s in out.items():
        s["paired"] = {
            other: {"diff": s["mean_normalized"] - o["mean_normalized"]}
            | boot.paired(row, other)
            for other, o in out.items()
            if other != row
        }
    return out


def markdown_table(summary: dict, tasks: list[str]) -> str:
    """Markdown: one row per model, accuracy per task with its 95 % interval, and the means."""
    n = next(iter(summary.values()))["n_test"]
    head = (
        "| model | "
        + " | ".join(f"{t} (n={n[t]})" for t in tasks)
        + " | mean acc | mean normalized |\n"
    )
    head += "|---" * (len(tasks) + 3) + "|\n"

    def cell(v: float, ci: list[float]) -> str:
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = [
        f"| {row} | "
        + " | ".join(cell(s["accuracy"][t], s["accuracy_ci"][t]) for t in tasks)
        + f" | {cell(s['mean_accuracy'], s['mean_accuracy_ci'])}"
        + f" | {cell(s['mean_normalized'], s['mean_normalized_ci'])} |"
        for row, s in summary.items()
    ]
    return head + "\n".join(lines) + "\n"


def comparisons_markdown(summary: dict, merges: list[str]) -> str:
    """The best single merged model against every other merge: paired intervals, noise called.

    Args:
        summary: :func:`summarize` output.
        merges: Rows that are one set of merged weights for all tasks (methods, learned runs).

    Returns:
        A markdown section (empty when there are fewer than two merges).
    """
    merges = [m for m in merges if m in summary]
    if len(merges) < 2:
        return ""
    best = max(merges, key=lambda m: summary[m]["mean_normalized"])
    out = (
        f"\n## Which merge to ship\n\nBest single merged model: **{best}** "
        f"(mean normalized {summary[best]['mean_normalized']:.3f}). Difference in mean "
        "normalized accuracy against each other merge, with its 95 % paired bootstrap interval "
        "over the same test texts; an interval that contains 0 means the test sets cannot tell "
        "the two apart.\n\n| other | difference | 95 % interval | verdict |\n|---|---:|---|---|\n"
    )
    for m in sorted(merges, key=lambda m: -summary[m]["mean_normalized"]):
        if m == best:
            continue
        p = summary[best]["paired"][m]
        verdict = "within noise" if p["within_noise"] else f"{best} better"
        out += f"| {m} | {p['diff']:+.3f} | [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] | {verdict} |\n"
    return out


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


def tasks_markdown(data_root: Path, tasks: list[str]) -> str:
    """The report's table of tasks: classes, input kind (a text or a sentence pair), source."""
    out = "| task | classes | input | source |\n|---|---|---|---|\n"
    for t in tasks:
        meta = read_meta(Path(data_root) / t)
        kind = "text + text_pair (encoded as a pair)" if meta.get("pair") else "text"
        out += f"| {t} | {', '.join(meta['label_names'])} | {kind} | {meta.get('source', '')} |\n"
    return out


def run(cfg: Params, paths: Paths) -> dict:
    """Score every model on every task's test split; write metrics, plot data and a report."""
    check_config(cfg)  # the merge methods in params.yaml (see methods.params.check_config)
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    test = ctx.batches(paths.data, "test")
    coef = json.loads((Path(paths.coefficients) / "coefficients.json").read_text())
    rows: dict[str, dict[str, torch.Tensor]] = {"expert": {}, "tall_masks": {}}
    for t in ctx.tasks:
        d = Path(paths.experts) / t
        rows["expert"][t] = ctx.correct(load_expert(d, expert_prefix(d))[0], test, [t])[t]
        tall = compression.load(paths.compressed, t, base=paths.base)[0]
        rows["tall_masks"][t] = ctx.correct(tall, test, [t])[t]
    cons_dir = Path(paths.tall_consensus) / "archive"
    if cons_dir.is_dir():
        rows["tall_consensus"] = {
            t: ctx.correct(compression.load(cons_dir, t, base=paths.base)[0], test, [t])[t]
            for t in ctx.tasks
        }
    lego_dir = Path(paths.lora_lego) / "adapter"
    if lego_dir.is_dir():
        prefix = expert_prefix(Path(paths.experts) / ctx.tasks[0])
        delta = lora_delta(*read_adapter(lego_dir), prefix)
        rows["lora_lego"] = ctx.correct(
            {
                k: (v.float() + delta[k]).to(v.dtype) if k in delta else v
                for k, v in ctx.base.items()
            },
            test,
        )
    # the base: θ_0 with a linear-probe head per task (saved by the finetune stage); experts
    # from before that fall back to θ_0 under the experts' own heads
    probes = {t: load_probe_head(Path(paths.experts) / t) for t in ctx.tasks}
    if all(h is not None for h in probes.values()):
        rows["base"] = ctx.correct_with_heads(ctx.base, test, probes)
    else:
        rows["base"] = ctx.correct(ctx.base, test)
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
        rows[name] = ctx.correct(merged, test, features=feats)
        twin_feats = feats if shared else twin_feats
    twin_scores = ctx.score_twin(
        twin_model, test, twin_model.manifest.get("routing", "top1"), features=twin_feats
    )
    rows["twin_merging"] = twin_scores["correct"]
    summary = summarize(rows, seed=cfg.seed)
    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=["model", "task", "accuracy", "normalized", "ci_low", "ci_high", "n_test"]
    )
    w.writeheader()
    for row, s in summary.items():
        for t in ctx.tasks:
            w.writerow(
                {
                    "model": row,
                    "task": t,
                    "accuracy": round(s["accuracy"][t], 4),
                    "normalized": round(s["normalized"][t], 4),
                    "ci_low": round(s["accuracy_ci"][t][0], 4),
                    "ci_high": round(s["accuracy_ci"][t][1], 4),
                    "n_test": s["n_test"][t],
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
        + "Each cell: accuracy and its 95 % Wilson interval on the task's n test texts; means "
        "with 95 % bootstrap intervals; normalized = accuracy ÷ the task's expert's.\n\n"
        + markdown_table(summary, ctx.tasks)
        + comparisons_markdown(summary, list(coef))
        + "\n## Accuracy per byte\n\nBytes on disk of each stored form against keeping every "
        f"expert ({sizes['bytes_experts'] / 1e6:.1f} MB for {len(ctx.tasks)} tasks; a merged model "
        f"is {sizes['bytes_merged'] / 1e6:.1f} MB). Plot: `dvc plots show plots/pareto.csv`.\n\n"
        + pareto_markdown(pareto)
        + "\n## Tasks\n\n"
        + tasks_markdown(paths.data, ctx.tasks)
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
