"""Merge safety: clean normalized accuracy and attack success rate of TA, TIES, DAM and a baseline.

    python benchmarks/merge_safety.py --keep /tmp/mergeflow-safety          # 8 default tasks
    python benchmarks/merge_safety.py --tasks rotten_tomatoes,bbc_news,fever --steps 40

One expert (``--poison``, default rotten_tomatoes) is fine-tuned on a train split with the trigger
"cf" inserted into ``--rate`` of its examples, relabelled to class ``--target``; the other experts
are clean. The experts are trained by the pipeline's own stage functions (prepare → base →
finetune → task_vectors; a ``--keep`` directory is reused, so a second run only re-merges). Then:

- task_arithmetic, ties (density 0.2) and prune_suspect (the poisoned expert's top ``--prune-top``
  |τ| removed) with the scaling λ picked on the clean validation split (the pipeline's grid);
- DAM (:mod:`mergeflow.safety.dam`) over task arithmetic at TA's λ, its masks learned on the
  unlabeled clean test inputs (the defender knows neither trigger nor poisoned task);
  ``--dam-trigger token`` (the pipeline's default) searches trigger words instead of the paper's
  soft trigger and quarantines rare ones; then a "quarantine over TA" row shows that step alone;
- SOMF-style masking (:mod:`mergeflow.safety.somf`) of the poisoned expert's task vector only
  (suspect known, trigger unknown), same data and simulated trigger as DAM.

Printed per method: mean clean test accuracy, mean normalized accuracy (merged / expert) and ASR on
the poisoned task (triggered test inputs of a non-target class classified as the target); a JSON
line with everything follows. MLflow tracking is off (``MERGEFLOW_TRACKING=off``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = (
    "rotten_tomatoes,tweet_sentiment,bbc_news,multiemo_hotels,multiemo_medicine,"
    "multiemo_products,fever,vitaminc"
)


def _params(args) -> dict:
    import yaml

    from mergeflow.config import deep_merge

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_merge(
        p,
        {
            "tasks": args.tasks.split(","),
            "base_model": {"max_length": args.max_length},
            "data": {"n_train": args.n_train, "n_val": 64, "n_test": args.n_test},
            "finetune": {"steps": args.steps, "batch_size": 16},
            "safety": {
                "enabled": True,
                "poison": {
                    "task": args.poison,
                    "trigger": "cf",
                    "rate": args.rate,
                    "target": args.target,
                    "seed": 0,
                    "max_position": 8,
                    "threat": args.threat,
                },
            },
        },
    )


def _train(cfg, ws: Path) -> None:
    from mergeflow.pipeline import base, finetune, prepare, task_vectors

    for t in cfg.tasks:
        if not (ws / "data/tasks" / t / "meta.json").exists():
            prepare.run(cfg, prepare.Paths(t, ws / "data/tasks" / t))
    if not (ws / "models/base/model.safetensors").exists():
        base.run(cfg, base.Paths(ws / "models/base"))
    for t in cfg.tasks:
        if not (ws / "models/experts" / t / "expert.json").exists():
            t0 = time.monotonic()
            finetune.run(
                cfg,
                finetune.Paths(
                    t,
                    ws / "data/tasks" / t,
                    ws / "models/base",
                    ws / "models/experts" / t,
                    ws / "metrics/finetune" / f"{t}.json",
                ),
            )
            print(f"finetune {t}: {time.monotonic() - t0:.0f} s", flush=True)
    if not all((ws / "artifacts/task_vectors" / f"{t}.safetensors").exists() for t in cfg.tasks):
        task_vectors.run(
            cfg,
            task_vectors.Paths(
                ws / "models/base", ws / "models/experts", ws / "artifacts/task_vectors"
            ),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="workspace dir (reused if present)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--poison", default="rotten_tomatoes")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument(
        "--threat",
        choices=["encoder", "model"],
        default="encoder",
        help="encoder: the poisoned expert's head is a clean probe, frozen (mergeflow.safety.threat)",
    )
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps per expert")
    ap.add_argument("--prune-top", type=float, default=0.01)
    ap.add_argument("--dam-steps", type=int, default=30)
    ap.add_argument("--dam-batch", type=int, default=8)
    ap.add_argument("--dam-mask-init", type=float, default=1.0)
    ap.add_argument("--dam-mask-lr", type=float, default=0.1)
    ap.add_argument("--dam-adv-weight", type=float, default=1.0)
    ap.add_argument("--dam-trigger", choices=["soft", "token"], default="soft")
    ap.add_argument("--dam-flip-threshold", type=float, default=0.9)
    ap.add_argument("--dam-candidates", type=int, default=32)
    ap.add_argument("--skip-baselines", action="store_true", help="only TA and DAM")
    ap.add_argument("--somf-steps", type=int, default=12, help="0: skip SOMF")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    os.environ.setdefault("MERGEFLOW_TRACKING", "off")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import torch

    from mergeflow import coefficients as lc
    from mergeflow import methods
    from mergeflow.config import parse_params
    from mergeflow.pipeline.artifacts import experts_from_vectors
    from mergeflow.pipeline.audit import (
        clean_batches,
        head_split_counts,
        model_asr,
        poison_spec,
        triggered_batches,
    )
    from mergeflow.pipeline.context import MergeContext
    from mergeflow.safety import DamSpec, SomfSpec, dam, somf, somf_merged
    from mergeflow.stats import paired_bootstrap, wilson

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    ws = args.keep or Path(tempfile.mkdtemp(prefix="mergeflow-safety-"))
    ws.mkdir(parents=True, exist_ok=True)
    cfg = parse_params(_params(args), source="benchmark params")
    t0 = time.monotonic()
    _train(cfg, ws)
    train_s = time.monotonic() - t0
    ctx = MergeContext.load(
        cfg, ws / "models/base", ws / "models/experts", ws / "artifacts/task_vectors"
    )
    val = ctx.batches(ws / "data/tasks", "val")
    test = ctx.batches(ws / "data/tasks", "test")
    spec = poison_spec(cfg)
    trig = triggered_batches(
        ws / "data/tasks", [args.poison], spec, ctx.tokenizer, cfg.base_model.max_length, 64
    )
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    rows: dict[str, dict] = {}
    expert_acc = {}
    per_text: dict[str, dict] = {}
    clean_train = clean_batches(
        ws / "data/tasks", args.poison, ctx.tokenizer, cfg.base_model.max_length, 64
    )
    base_head: dict = {}

    def split(encoder: dict) -> dict:
        """ASR (k, n) under the own head, a clean head over this encoder, θ_0's clean head."""
        counts, fitted = head_split_counts(
            ctx, encoder, args.poison, trig[args.poison], clean_train, base_head.get("h"),
            spec.target, epochs=cfg.finetune.probe_epochs, seed=cfg.seed,
        )  # fmt: skip
        base_head.setdefault("h", fitted)
        return {
            k: {"asr": a / n, "ci": list(wilson(a, n)), "k": a, "n": n}
            for k, (a, n) in counts.items()
        }

    rows["base"] = {"scaling": None, "clean": {}, "split": split(ctx.base)}
    from mergeflow.pipeline.artifacts import expert_prefix, load_expert

    for t in ctx.tasks:
        d = ws / "models/experts" / t
        enc = load_expert(d, expert_prefix(d))[0]
        expert_acc[t] = ctx.score(enc, test, [t])[t]
        if t == args.poison:
            rows["expert (poisoned)"] = {
                "scaling": None,
                "clean": {t: expert_acc[t]},
                "asr": model_asr(ctx, enc, trig, spec.target)[t],
                "split": split(enc),
            }

    def record(name: str, merged: dict, scaling, extra: dict | None = None) -> None:
        per_text[name] = ctx.correct(merged, test)
        acc = {t: float(c.float().mean()) for t, c in per_text[name].items()}
        norm = {t: acc[t] / expert_acc[t] for t in ctx.tasks}
        sp = split(merged)
        rows[name] = {
            "scaling": scaling,
            "clean": acc,
            "mean_accuracy": sum(acc.values()) / len(acc),
            "mean_normalized": sum(norm.values()) / len(norm),
            "asr": sp["own"]["asr"],
            "asr_ci": sp["own"]["ci"],
            "n_triggered": sp["own"]["n"],
            "split": sp,
            **(extra or {}),
        }
        if name != "task_arithmetic" and "task_arithmetic" in per_text:
            d = paired_bootstrap(per_text[name], per_text["task_arithmetic"])
            rows[name]["mean_acc_minus_ta"] = d
        print(
            f"{name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'clean'})}",
            flush=True,
        )

    grid = cfg.coefficients.grid
    hps = {
        "task_arithmetic": {},
        "ties": {"density": 0.2},
        "prune_suspect": {"suspect": args.poison, "top": args.prune_top},
    }
    if args.skip_baselines:
        hps = {"task_arithmetic": {}}
    for name, hp in hps.items():
        scores = {}
        for lam, merged in methods.merge_grid(name, ctx.base, experts, grid, **hp):
            a = ctx.score(merged, val)
            scores[lam] = sum(a.values()) / len(a)
        best = max(scores, key=lambda lam: (scores[lam], -lam))
        record(name, methods.merge(name, ctx.base, experts, scaling=best, **hp), best)
    ta_lam = rows["task_arithmetic"]["scaling"]
    models = ctx.models.models
    prefix = next(iter(models.values())).base_model_prefix
    fm = lc.FunctionalMerge(ctx.base, ctx.task_vectors, lc.BlockScheme("task"))
    unlabeled = {
        t: lc.load_examples(
            ws / "data/tasks", t, "test", ctx.tokenizer, cfg.base_model.max_length
        ).unlabeled()
        for t in ctx.tasks
    }
    t1 = time.monotonic()
    res = dam(
        fm,
        models,
        prefix,
        unlabeled,
        DamSpec(
            steps=args.dam_steps,
            init=ta_lam,
            mask_init=args.dam_mask_init,
            mask_lr=args.dam_mask_lr,
            adv_weight=args.dam_adv_weight,
            batch_size=args.dam_batch,
            trigger=args.dam_trigger,
            flip_threshold=args.dam_flip_threshold,
            candidates=args.dam_candidates,
            # the masks never read the switch: one run gives DAM alone and DAM + quarantine
            quarantine=args.dam_trigger == "token",
        ),
        on_step=lambda s, r: print(f"  dam step {s}: {r}", flush=True),
        special_ids=ctx.tokenizer.all_special_ids,
        unk_id=ctx.tokenizer.unk_token_id,
    )
    dam_s = time.monotonic() - t1
    words = ctx.tokenizer.convert_ids_to_tokens
    for t, trs in res.triggers.items():
        found = [(words(tr.token_id), tr.target, round(tr.flip_rate, 2)) for tr in trs]
        print(f"  triggers found for {t}: {found}")
    if res.quarantine is not None:
        print(f"  quarantined: {[words(w) for w in res.quarantine.rows]}")
    with torch.no_grad():
        enc = fm.merged(res.alpha, res.mask)
        merged = {k: v.to(ctx.base[k].dtype) for k, v in enc.items()}
        record("dam (masks only)", merged, ta_lam, {"flipped": res.flipped})
        if res.quarantine is not None and res.quarantine.rows:
            ta_enc = fm.merged(fm.full_alpha(ta_lam))
            q = {k: v.to(ctx.base[k].dtype) for k, v in res.quarantine.apply(ta_enc).items()}
            record("quarantine over TA", q, ta_lam, {"rows": len(res.quarantine.rows)})
            enc = res.quarantine.apply(enc)
        merged = {k: v.to(ctx.base[k].dtype) for k, v in enc.items()}
    record(
        "dam + quarantine",
        merged,
        ta_lam,
        {
            "flipped": res.flipped,
            "shared_density": res.shared_density,
            "detection_density": res.detection_density,
            "seconds": dam_s,
            "triggers": {
                t: [[words(tr.token_id), tr.target, tr.flip_rate] for tr in trs]
                for t, trs in res.triggers.items()
            },
            "quarantined": [words(w) for w in res.quarantine.rows] if res.quarantine else [],
        },
    )
    if args.somf_steps:
        t1 = time.monotonic()
        mask, _ = somf(
            fm,
            models,
            prefix,
            unlabeled,
            SomfSpec(
                suspect=args.poison,
                steps=args.somf_steps,
                scaling=ta_lam,
                mask_init=args.dam_mask_init,
                mask_lr=args.dam_mask_lr,
                adv_weight=args.dam_adv_weight,
                batch_size=args.dam_batch,
            ),
            on_step=lambda s, r: print(f"  somf step {s}: {r}", flush=True),
        )
        somf_s = time.monotonic() - t1
        kept = sum(float(v.sum()) for v in mask.values()) / sum(v.numel() for v in mask.values())
        with torch.no_grad():
            merged = somf_merged(fm, ta_lam, args.poison, mask)
            merged = {k: v.to(ctx.base[k].dtype) for k, v in merged.items()}
        record("somf", merged, ta_lam, {"suspect_density": kept, "seconds": somf_s})
    ta = rows["task_arithmetic"]
    print(
        f"\nworkspace {ws}; experts trained in {train_s:.0f} s; poisoned {args.poison} "
        f"(rate {args.rate}, target {args.target}); {len(ctx.tasks)} tasks"
    )
    def ci(x: dict) -> str:
        return f"{x['asr']:.3f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"

    print(
        "| method | λ | mean acc | Δ mean acc vs TA (pts) [95 % CI] | mean normalized | "
        "ASR [95 % CI] | Δ ASR vs TA (pts) | mask flipped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "mean_normalized" not in r:
            continue
        d = r.get("mean_acc_minus_ta")
        dd = (
            f"{100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"
            if d
            else "0"
        )
        fl = f"{100 * r['flipped']:.2f} %" if "flipped" in r else "–"
        print(
            f"| {name} | {r['scaling']} | {r['mean_accuracy']:.3f} | {dd} | "
            f"{r['mean_normalized']:.3f} | {ci(r['split']['own'])} | "
            f"{100 * (r['asr'] - ta['asr']):+.1f} | {fl} |"
        )
    print(f"\nWhere the backdoor lives ({args.poison}, n = {ta['n_triggered']} triggered texts):")
    print("| model | ASR, own head | ASR, clean head on this encoder | ASR, θ₀'s clean head |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        sp = r["split"]
        print(f"| {name} | {ci(sp['own'])} | {ci(sp['clean_head'])} | {ci(sp['base_head'])} |")
    print(
        json.dumps(
            {"args": vars(args) | {"keep": str(ws)}, "expert_accuracy": expert_acc, "rows": rows},
            default=str,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
