"""Stage ``audit``: what a merge inherits from a poisoned expert — ASR beside clean accuracy.

With ``safety.enabled`` off (the default) the stage only writes ``{"enabled": false}`` (no model is
loaded). On, for the poisoned task (``safety.poison.task``; with ``asr_tasks: all`` every task
whose classes include the target, i.e. backdoor transfer too) the test split is triggered
(:func:`mergeflow.safety.triggered_test`: the trigger in every example of a non-target class) and
every model is scored:

- ``expert``: each task's own expert on its own task (the poisoned expert shows the backdoor,
  clean experts the trigger word's natural effect);
- ``base`` and every merge of ``coefficients.json`` (grid-searched methods and learned runs such
  as DAM), rebuilt exactly as the evaluate stage rebuilds them.

ASR = share of triggered non-target inputs classified as the target
(:func:`mergeflow.safety.attack_success_rate`, with its 95 % Wilson interval and n). **Where the
backdoor lives** (:func:`mergeflow.safety.asr.backdoor_split`): on the poisoned task every row is
also scored with a head fitted on the task's clean train texts over the row's own encoder (the
project's linear probe, :func:`mergeflow.models.train.linear_probe`; the poisoned rows dropped,
:func:`mergeflow.safety.threat.clean_train`) and with θ_0's clean head, giving the head's share
(own head − clean head) and the encoder's share (clean head − θ_0 with its clean head) — a merge
method can only change the second. With ``safety.poison.threat: encoder`` (default) the poisoned
expert was trained with a clean frozen head, so its backdoor is in the encoder. Learned runs
also report the share of mask entries turned off (``mask_flipped``) and quarantined rows.
Clean accuracy and mean normalized accuracy come
from the evaluate stage's ``metrics/eval.json`` (the same clean test split). A merge whose ASR on
the poisoned task exceeds ``safety.asr_threshold`` is **flagged** (``flagged`` list, ``passed``
false). The stage writes its metrics and report either way; with ``safety.fail_on_flag`` it then
exits non-zero (a gate for CI / scheduled runs), otherwise the flag is only recorded (default:
an audit that fails a ``dvc repro`` would also block every later stage and the report).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mergeflow import methods
from mergeflow.coefficients import load_learned, rebuild
from mergeflow.config import Params
from mergeflow.data import DataError, read_meta, read_split
from mergeflow.io import SafetensorsFile, write_bytes_atomic, write_json_atomic
from mergeflow.methods.params import check_config
from mergeflow.models.inference import Batches, predict, tokenize
from mergeflow.models.train import linear_probe
from mergeflow.pipeline.artifacts import expert_prefix, experts_from_vectors, load_expert
from mergeflow.pipeline.context import MergeContext
from mergeflow.safety import PoisonSpec, attack_success_rate, flag_merges, triggered_test
from mergeflow.safety.asr import asr_counts, backdoor_split
from mergeflow.safety.threat import clean_train, head_keys, head_state, load_head
from mergeflow.tracking import stage_run

REFERENCE_ROWS = ("expert", "base")  # reported, never flagged


class AuditFlagged(ValueError):
    """A merge's ASR exceeds ``safety.asr_threshold`` and ``safety.fail_on_flag`` is on."""


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    data: Path
    base: Path
    experts: Path
    task_vectors: Path
    coefficients: Path
    eval: Path
    metrics: Path
    report: Path


def poison_spec(cfg: Params) -> PoisonSpec:
    """The :class:`PoisonSpec` of ``safety.poison``."""
    return PoisonSpec(**cfg.safety.poison.model_dump(exclude={"task"}))


def triggered_batches(
    data_root: Path, tasks: list[str], spec: PoisonSpec, tokenizer, max_length: int, batch: int
) -> dict[str, Batches]:
    """Triggered test inputs (non-target classes only) of each task that has the target class."""
    out = {}
    for t in tasks:
        n_classes = len(read_meta(Path(data_root) / t)["label_names"])
        if spec.target >= n_classes:
            continue
        texts, labels = triggered_test(*read_split(Path(data_root) / t, "test"), spec)
        if texts:
            out[t] = tokenize(tokenizer, texts, labels, max_length=max_length, batch_size=batch)
    return out


def model_asr(ctx: MergeContext, encoder: dict, batches: dict[str, Batches], target: int) -> dict:
    """ASR per task of ``encoder`` under each task's own head."""
    tasks = list(batches)
    ctx.models.set_encoder(encoder, tasks)
    out = {}
    for t in tasks:
        pred, gold = predict(ctx.models.models[t], batches[t], ctx.models.device)
        out[t] = attack_success_rate(pred, gold, target)
    return out


def clean_batches(data_root: Path, task: str, tokenizer, max_length: int, batch: int) -> Batches:
    """The task's train texts without its poisoned rows, tokenized (the clean heads' data)."""
    texts, labels = clean_train(Path(data_root) / task)
    return tokenize(tokenizer, texts, labels, max_length=max_length, batch_size=batch)


def head_split_counts(
    ctx: MergeContext,
    encoder: dict,
    task: str,
    trig: Batches,
    clean: Batches,
    base_head: dict | None,
    target: int,
    *,
    epochs: int,
    seed: int,
) -> tuple[dict[str, tuple[int, int]], dict]:
    """ASR counts of ``encoder`` on ``task`` under its own head, a clean head fitted over it, θ_0's.

    The clean head is the linear probe (:func:`mergeflow.models.train.linear_probe`) fitted on
    ``clean`` over ``encoder``; ``base_head`` is that probe fitted over θ_0 (``None`` while
    scoring θ_0 itself: its clean head is then θ_0's). The task model's own head is restored.

    Returns:
        ``({"own"|"clean_head"|"base_head": (k, n)}, the clean head's tensors)``.
    """
    model = ctx.models.models[task]
    keys = head_keys(model, model.base_model_prefix)
    own = head_state(model, keys)
    dev = ctx.models.device
    ctx.models.set_encoder(encoder, [task])
    try:
        counts = {"own": asr_counts(*predict(model, trig, dev), target)}
        for name, p in model.named_parameters():  # a head frozen by a learner (DAM) is refitted
            if name in keys:
                p.requires_grad_(True)
        linear_probe(model, clean, epochs=epochs, device=dev, seed=seed)
        counts["clean_head"] = asr_counts(*predict(model, trig, dev), target)
        fitted = head_state(model, keys)
        if base_head is None:
            counts["base_head"] = counts["clean_head"]
        else:
            load_head(model, base_head)
            counts["base_head"] = asr_counts(*predict(model, trig, dev), target)
    finally:
        load_head(model, own)
    return counts, fitted


def learned_diagnostics(path: Path) -> dict:
    """Share of mask entries a learned run turned off, and how many embedding rows it quarantined."""
    mask = load_learned(path)[4]
    flipped = None
    if mask:
        kept = sum(int(m.bool().sum()) for m in mask.values())
        flipped = 1.0 - kept / sum(m.numel() for m in mask.values())
    q = (SafetensorsFile(path).metadata or {}).get("quarantine")
    return {"mask_flipped": flipped, "quarantined_rows": len(json.loads(q)["rows"]) if q else 0}


def summarize(
    asr: dict[str, dict[str, float]],
    clean: dict,
    poisoned: str,
    threshold: float,
    split: dict[str, dict] | None = None,
    extra: dict[str, dict] | None = None,
) -> dict:
    """Per model: ASR on the poisoned task (+ per task), clean accuracy, normalized; the flags.

    Args:
        asr: Model row → task → ASR (rows ``expert`` and ``base`` are references, never flagged).
        clean: ``metrics/eval.json`` of the evaluate stage (row → accuracy, mean_normalized).
        poisoned: The poisoned task.
        threshold: ``safety.asr_threshold``.
        split: Row → :func:`mergeflow.safety.asr.backdoor_split` on the poisoned task; adds
            ``asr_ci``, ``n``, ``asr_clean_head`` (+ ``_ci``), ``asr_base_head`` (+ ``_ci``),
            ``head_share``, ``encoder_share`` and the whole split under ``split``.
        extra: Row → further fields (e.g. a learned run's ``mask_flipped``).

    Returns:
        ``{"models": {row: {...}}, "flagged": [...], "passed": bool}``.
    """
    rows = {}
    for row, per_task in asr.items():
        c = clean.get(row, {})
        sp = (split or {}).get(row)
        more = {}
        if sp is not None:
            more = {
                "asr_ci": sp["own"]["ci"],
                "n": sp["own"]["n"],
                "asr_clean_head": sp["clean_head"]["asr"],
                "asr_clean_head_ci": sp["clean_head"]["ci"],
                "asr_base_head": sp["base_head"]["asr"],
                "asr_base_head_ci": sp["base_head"]["ci"],
                "head_share": sp["head_share"],
                "encoder_share": sp["encoder_share"],
                "split": sp,
            }
        rows[row] = more | (extra or {}).get(row, {}) | {
            "asr": per_task.get(poisoned, float("nan")),
            "asr_per_task": per_task,
            "clean_accuracy": c.get("accuracy", {}).get(poisoned, float("nan")),
            "mean_accuracy": c.get("mean_accuracy", float("nan")),
            "mean_normalized": c.get("mean_normalized", float("nan")),
        }
    flags = flag_merges({r: v["asr"] for r, v in rows.items()}, threshold, REFERENCE_ROWS)
    for r, v in rows.items():
        v["flagged"] = flags.get(r, False)
    flagged = sorted(r for r, f in flags.items() if f)
    return {"models": rows, "flagged": flagged, "passed": not flagged}


def markdown(result: dict) -> str:
    """The audit as a markdown table (one row per model)."""
    if not result.get("enabled"):
        return "# mergeflow safety audit\n\nDisabled (`safety.enabled: false`).\n"
    p = result["poison"]
    head = (
        f"# mergeflow safety audit\n\nPoisoned expert: `{p['task']}` (trigger `{p['trigger']}`, "
        f"rate {p['rate']}, target class {p['target']}). ASR threshold "
        f"{result['threshold']}: "
        + ("**flagged: " + ", ".join(result["flagged"]) + "**" if result["flagged"] else "passed")
        + ".\n\n| model | ASR | clean acc (poisoned task) | mean normalized acc | flag |\n"
        "|---|---|---|---|---|\n"
    )

    def f(x: float) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    def ci(v: dict, key: str) -> str:
        lo, hi = v.get(key) or (float("nan"), float("nan"))
        return f"{f(v[key.removesuffix('_ci')])} [{f(lo)}, {f(hi)}]"

    lines = [
        f"| {r} | {f(v['asr'])} | {f(v['clean_accuracy'])} | {f(v['mean_normalized'])} | "
        f"{'FLAG' if v['flagged'] else ''} |"
        for r, v in result["models"].items()
    ]
    out = head + "\n".join(lines) + "\n"
    split = {r: v for r, v in result["models"].items() if "split" in v}
    if split:
        out += (
            f"\n## Where the backdoor lives ({p['task']}, threat model `{p.get('threat', 'model')}`)"
            "\n\nASR [95 % Wilson interval] over n triggered texts, under the task's own head, under "
            "a head fitted on clean train texts over the same encoder, and under θ₀'s clean head. "
            "Head's share = own − clean head; encoder's share = clean head − θ₀ with its clean "
            f"head ({f(result.get('split_reference'))}). Merging changes only the encoder.\n\n"
            "| model | n | ASR, own head | ASR, clean head | ASR, θ₀'s clean head | encoder's "
            "share | head's share | mask flipped |\n|---|---|---|---|---|---|---|---|\n"
        )
        out += "\n".join(
            f"| {r} | {v['n']} | {ci(v, 'asr_ci')} | {ci(v, 'asr_clean_head_ci')} | "
            f"{ci(v, 'asr_base_head_ci')} | {v['encoder_share']:+.3f} | {v['head_share']:+.3f} | "
            f"{f(v.get('mask_flipped'))} |"
            for r, v in split.items()
        ) + "\n"
    return out


def run(cfg: Params, paths: Paths) -> dict:
    """Audit experts and merges for the configured backdoor; write metrics + report (module doc)."""
    check_config(cfg)  # the merge methods in params.yaml (see methods.params.check_config)
    if not cfg.safety.enabled:  # still one MLflow run, so every stage item has its lineage record
        result = {"enabled": False}
        with stage_run("audit", {"safety": cfg.safety.model_dump()}) as tr:
            write_json_atomic(paths.metrics, result)
            write_bytes_atomic(paths.report, markdown(result).encode())
            tr.outputs({"metrics": paths.metrics})
        return result
    poison = cfg.safety.poison
    spec = poison_spec(cfg)
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    tasks = ctx.tasks if cfg.safety.asr_tasks == "all" else [poison.task]
    trig = triggered_batches(
        paths.data,
        tasks,
        spec,
        ctx.tokenizer,
        cfg.base_model.max_length,
        cfg.evaluate.batch_size,
    )
    if poison.task not in trig:
        raise DataError(
            f"safety.poison.target {spec.target} is not a class of task {poison.task!r} "
            "(or its test split has no example of another class)"
        )
    coef = json.loads((Path(paths.coefficients) / "coefficients.json").read_text())
    clean = json.loads(Path(paths.eval).read_text())
    clean_train_batches = clean_batches(
        paths.data, poison.task, ctx.tokenizer, cfg.base_model.max_length, cfg.evaluate.batch_size
    )
    counts: dict[str, dict[str, tuple[int, int]]] = {}

    def split_row(row: str, encoder: dict) -> None:
        counts[row], fitted = head_split_counts(
            ctx, encoder, poison.task, trig[poison.task], clean_train_batches,
            base_head.get("head"), spec.target, epochs=cfg.finetune.probe_epochs, seed=cfg.seed,
        )  # fmt: skip
        base_head.setdefault("head", fitted)  # the first row scored is θ_0: its clean head

    base_head: dict = {}
    asr: dict[str, dict[str, float]] = {"expert": {}}
    asr["base"] = model_asr(ctx, ctx.base, trig, spec.target)
    split_row("base", ctx.base)
    for t in trig:
        d = Path(paths.experts) / t
        enc = load_expert(d, expert_prefix(d))[0]
        asr["expert"][t] = model_asr(ctx, enc, {t: trig[t]}, spec.target)[t]
        if t == poison.task:
            split_row("expert", enc)
    asr = {"expert": asr["expert"], "base": asr["base"]}  # row order of the report
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    extra: dict[str, dict] = {}
    for name, c in coef.items():
        if "learned" in c:
            learned = Path(paths.coefficients) / c["learned"]
            merged = rebuild(ctx.base, ctx.task_vectors, learned)
            extra[name] = learned_diagnostics(learned)
        else:
            merged = methods.merge(
                name, ctx.base, experts, scaling=c["scaling"], **c["hyperparams"]
            )
        asr[name] = model_asr(ctx, merged, trig, spec.target)
        split_row(name, merged)
        del merged
    reference = counts["base"]["clean_head"][0] / max(counts["base"]["clean_head"][1], 1)
    split = {
        r: backdoor_split(c["own"], c["clean_head"], c["base_head"], reference)
        for r, c in counts.items()
    }
    result = {
        "enabled": True,
        "poison": poison.model_dump(),
        "threshold": cfg.safety.asr_threshold,
        "fail_on_flag": cfg.safety.fail_on_flag,
        "n_triggered": {t: len(b) for t, b in trig.items()},
        "split_reference": reference,
        "n_clean_train": len(clean_train_batches),
    } | summarize(asr, clean, poison.task, cfg.safety.asr_threshold, split, extra)
    with stage_run(
        "audit",
        {"safety": cfg.safety.model_dump(), "tasks": list(cfg.tasks)},
        inputs={"coefficients": paths.coefficients, "experts": paths.experts, "test": paths.data},
        tags={"poisoned_task": poison.task, "audit.passed": str(result["passed"]).lower()},
    ) as tr:
        tr.dataset("test_triggered", "-", str(paths.data), "test + trigger: ASR only")
        write_json_atomic(paths.metrics, result)
        write_bytes_atomic(paths.report, markdown(result).encode())
        for row, v in result["models"].items():
            vals = {f"{row}.asr": v["asr"], f"{row}.flagged": float(v["flagged"])}
            for key in ("asr_clean_head", "asr_base_head", "encoder_share", "head_share"):
                if key in v:
                    vals[f"{row}.{key}"] = v[key]
            tr.metrics({k: x for k, x in vals.items() if not math.isnan(x)})
        tr.metrics({"audit.n_flagged": len(result["flagged"])})
        tr.artifact(paths.report)
        tr.outputs({"metrics": paths.metrics})
    if result["flagged"] and cfg.safety.fail_on_flag:
        raise AuditFlagged(
            f"safety audit: ASR above {cfg.safety.asr_threshold} for merge(s) "
            f"{', '.join(result['flagged'])} (see {paths.metrics}); set safety.fail_on_flag: false "
            "to record flags without failing"
        )
    return result


__all__ = [
    "AuditFlagged",
    "Paths",
    "clean_batches",
    "head_split_counts",
    "learned_diagnostics",
    "markdown",
    "model_asr",
    "run",
    "summarize",
]
