"""Accuracy per byte of every compressed form over 2, 4 and 8 tasks, side by side, in one run.

    python benchmarks/compression.py --workspace /tmp/comp-ws          # after `dvc repro compress`
    python benchmarks/compression.py --workspace WS --counts 2 4 8 --ranks 4 16 64 --json out.json

Uses a reproduced workspace's θ_0, experts, task vectors and splits (its params.yaml). For the first
n tasks of ``tasks`` (n in ``--counts``) it rebuilds, exactly as the pipeline does:

- TALL (Wang et al., ICML 2024): τ_MTL over the n tasks, λ_t picked per task on validation from
  ``masks.lambdas``, archive θ_0 by reference (and with θ_0); TALL + consensus (k =
  ``masks.consensus_k``, compact τ_MTL);
- merged models: task arithmetic and TIES, λ picked on validation from ``coefficients.grid``;
- Twin-Merging (Lu et al., NeurIPS 2024): shared = the task-arithmetic merge, router trained on
  validation, exclusive parts at every rank in ``--ranks``, top-1 routed batch inference;

and prints bytes on disk, ratios to the experts' bytes (each task's full fine-tuned model file) and
test accuracy (mean, mean normalized = acc / expert acc, and the worst task's normalized acc).
It also measures the peak RSS of streaming one TALL reconstruction vs loading every expert.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergeflow import compression, methods, tensors
from mergeflow.compression import twin
from mergeflow.config import load_params
from mergeflow.io import save_state_dict
from mergeflow.masks import pack_masks, tall_masks_from_vectors
from mergeflow.pipeline.artifacts import expert_prefix, experts_from_vectors, load_expert
from mergeflow.pipeline.compress import dir_bytes, router_data
from mergeflow.pipeline.context import MergeContext
from mergeflow.pipeline.masks import lambda_grid


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def pick(scores: dict) -> float:
    """The candidate with the best validation mean (smallest on ties)."""
    return min(scores, key=lambda k: (-scores[k], k))


def peak_rss_mb(code: str) -> float:
    """Peak resident memory (MB) of a fresh Python process running ``code``.

    ``VmHWM`` of ``/proc/self/status`` (reset at exec). Not ``getrusage().ru_maxrss``: Linux
    keeps that high-water mark across fork + exec, so a child of a big parent reports at
    least the parent's size (every row read 4470 MB in the first 8-task run).
    """
    prog = code + (
        "\nprint(next(int(line.split()[1]) for line in open('/proc/self/status')"
        " if line.startswith('VmHWM:')))"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    ws = args.workspace
    t_start = time.monotonic()
    cfg = load_params(ws / "params.yaml")
    ctx_all = MergeContext.load(
        cfg, ws / "models/base", ws / "models/experts", ws / "artifacts/task_vectors"
    )
    base_file = ws / "models/base/model.safetensors"
    test, val = (
        ctx_all.batches(ws / "data/tasks", "test"),
        ctx_all.batches(ws / "data/tasks", "val"),
    )
    heads, configs, expert_bytes, expert_acc = {}, {}, {}, {}
    for t in cfg.tasks:
        d = ws / "models/experts" / t
        prefix = expert_prefix(d)
        enc, heads[t] = load_expert(d, prefix)
        configs[t] = json.loads((d / "config.json").read_text())
        expert_bytes[t] = (d / "model.safetensors").stat().st_size
        expert_acc[t] = ctx_all.score(enc, test, [t])[t]
    base_bytes = base_file.stat().st_size
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="mergeflow-comp-"))

    for n in args.counts:
        tasks = list(cfg.tasks)[:n]
        ctx = dataclasses.replace(ctx_all, tasks=tasks)
        tvs = {t: ctx_all.task_vectors[t] for t in tasks}
        experts_total = sum(expert_bytes[t] for t in tasks)
        heads_n = {t: heads[t] for t in tasks}

        def add(form, setting, nbytes, accs, n=n, experts_total=experts_total, tasks=tasks):
            norm = {t: accs[t] / expert_acc[t] for t in tasks}
            rows.append(
                {
                    "n_tasks": n,
                    "form": form,
                    "setting": setting,
                    "bytes": nbytes,
                    "bytes_ratio": nbytes / experts_total,
                    "mean_accuracy": mean(accs.values()),
                    "mean_normalized": mean(norm.values()),
                    "min_normalized": min(norm.values()),
                }
            )
            r = rows[-1]
            print(
                f"  n={n} {form:15s} {setting:28s} {nbytes / 1e6:8.1f} MB  ×{r['bytes_ratio']:.3f}"
                f"  acc {r['mean_accuracy']:.3f}  norm {r['mean_normalized']:.3f}"
                f"  worst {r['min_normalized']:.3f}",
                flush=True,
            )

        add("experts", "one model per task", experts_total, {t: expert_acc[t] for t in tasks})
        # TALL: λ_t per task on validation, as the masks stage does
        mtl = tensors.sum_all(list(tvs.values()))
        chosen = lambda_grid(ctx, tvs, val, cfg.masks.lambdas, mtl).choose(cfg.masks.select)
        packed, meta = pack_masks(tall_masks_from_vectors(tvs, chosen, mtl=mtl))
        save_state_dict(packed, tmp / f"masks{n}.safetensors", metadata=meta)
        for form, k in (("tall", None), ("tall_consensus", cfg.masks.consensus_k)):
            arc = tmp / f"{form}{n}"
            compression.write_archive(
                arc,
                base_file,
                mtl,
                tmp / f"masks{n}.safetensors",
                heads_n,
                configs,
                encoder_prefix=prefix,
                mtl_dtype=cfg.compress.mtl_dtype,
                include_base=False,
                consensus_k=k,
            )
            accs = {
                t: ctx.score(compression.load(arc, t, base=base_file)[0], test, [t])[t]
                for t in tasks
            }
            label = f"k={k}, " if k else ""
            nbytes = compression.archive_bytes(arc)
            add(form, f"{label}θ0 by reference", nbytes, accs)
            add(form, f"{label}θ0 included", nbytes + base_bytes, accs)
        # merged models: λ on validation
        experts = experts_from_vectors(ctx.base, tvs)
        merged_bytes = base_bytes + dir_bytes(tmp / f"tall{n}", "heads")
        shared = None
        for name in ("task_arithmetic", "ties"):
            hp = dict(cfg.evaluate.methods.get(name, {}))
            val_scores = {
                lam: mean(ctx.score(merged, val).values())
                for lam, merged in methods.merge_grid(
                    name, ctx.base, experts, cfg.coefficients.grid, **hp
                )
            }
            lam = pick(val_scores)
            merged = methods.merge(name, ctx.base, experts, scaling=lam, **hp)
            add("merged", f"{name} λ={lam}", merged_bytes, ctx.score(merged, test))
            if name == cfg.compress.twin_shared:
                shared, shared_lam = merged, lam
        if shared is None:
            raise SystemExit(f"compress.twin_shared={cfg.compress.twin_shared} is not TA or TIES")
        feats, ids = router_data(ctx, ws / "data/tasks", shared)
        router = twin.train_router(
            feats, ids, n, epochs=cfg.compress.twin_router_epochs, seed=cfg.seed
        )
        for rank in args.ranks:
            arc = tmp / f"twin{n}_{rank}"
            twin.write_archive(
                arc,
                shared,
                experts,
                heads_n,
                router,
                rank=rank,
                dtype=cfg.compress.twin_dtype,
                extra={"shared": cfg.compress.twin_shared, "scaling": shared_lam},
            )
            sc = ctx.score_twin(twin.TwinModel(arc), test, "top1")
            routed = mean(sc["routing_accuracy"].values())
            add(
                "twin",
                f"rank {rank} (routed ok {routed:.2f})",
                compression.archive_bytes(arc),
                sc["accuracy"],
            )

    n_max = max(args.counts)
    arc = tmp / f"tall{n_max}"
    stream = peak_rss_mb(
        "from mergeflow import compression\n"
        f"for _ in compression.iter_task({str(arc)!r}, {cfg.tasks[0]!r}, {str(base_file)!r}): pass"
    )
    files = [str(ws / "models/experts" / t / "model.safetensors") for t in cfg.tasks[:n_max]]
    load_all = peak_rss_mb(
        f"from mergeflow.io import load_state_dict\nsds = [load_state_dict(p) for p in {files!r}]"
    )
    baseline = peak_rss_mb("import torch, mergeflow.io, mergeflow.compression")
    print(
        f"\npeak RSS: streaming one TALL reconstruction {stream:.0f} MB; loading all {n_max} "
        f"experts {load_all:.0f} MB; interpreter+torch alone {baseline:.0f} MB "
        f"(one expert file {expert_bytes[cfg.tasks[0]] / 1e6:.0f} MB)"
    )
    print(f"total wall time {time.monotonic() - t_start:.0f} s; archives in {tmp}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "peak_rss_mb": {
                        "tall_stream": stream,
                        "load_all": load_all,
                        "baseline": baseline,
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("MERGEFLOW_THREADS", "2")))
    main()
