"""Where does merging get hard? Base vs experts vs merges for several fine-tuning settings, one run.

    python benchmarks/regime.py --tasks rotten_tomatoes tweet_sentiment bbc_news fever \\
        --setting lpft:linear_probe:1e-4 --setting ft:random:1e-4 --steps 150

For every task: θ₀ with a linear-probe head (the "base"), then for every setting an expert trained
from θ₀ (head init ``linear_probe`` = LP-FT, or ``random`` = plain fine-tuning; the given peak lr;
the same steps, data and seed), and then, per setting, task arithmetic and TIES merges of that
setting's experts with λ picked on validation. Each task is scored with its own head. Prints
per-task test accuracy with 95 % Wilson intervals, the relative size of the task vectors
(‖τ‖ / ‖θ₀‖) and their mean pairwise cosine, and mean normalized accuracy (merge ÷ expert) —
the numbers that say which lever moves the pipeline into the regime where merges differ.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch

from mergeflow.data import load_task, make_splits
from mergeflow.methods import merge
from mergeflow.models.hf import (
    encoder_prefix,
    load_encoder_into,
    offline_env,
    resolve_model_path,
    seq_cls_model,
    split_state_dict,
)
from mergeflow.models.inference import accuracy, tokenize
from mergeflow.models.train import finetune, linear_probe
from mergeflow.stats import wilson

GRID = (0.2, 0.3, 0.5, 0.7, 1.0)


def _split(task: str, args) -> dict:
    texts, labels, names = load_task(task)
    s = make_splits(
        texts, labels, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test
    )
    return {k: ([r["text"] for r in v], [r["label"] for r in v]) for k, v in s.items()} | {
        "names": names
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", nargs="+", required=True)
    ap.add_argument(
        "--setting",
        action="append",
        required=True,
        help="name:head_init:lr, e.g. ft:random:1e-4 (repeatable)",
    )
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    offline_env()
    torch.set_num_threads(torch.get_num_threads())
    from transformers import AutoTokenizer

    path = resolve_model_path("packaged:all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    settings = []
    for s in args.setting:
        name, head, lr = s.split(":")
        settings.append((name, head, float(lr)))

    data, models, base_acc = {}, {}, {}
    theta0 = None
    experts: dict[str, dict[str, dict]] = {n: {} for n, _, _ in settings}
    heads: dict[str, dict[str, dict]] = {n: {} for n, _, _ in settings}
    exp_acc: dict[str, dict[str, float]] = {n: {} for n, _, _ in settings}
    t_start = time.monotonic()
    for task in args.tasks:
        d = _split(task, args)
        data[task] = d
        val = tokenize(tok, *d["val"], max_length=args.max_length, batch_size=64)
        test = tokenize(tok, *d["test"], max_length=args.max_length, batch_size=64)
        d["val_b"], d["test_b"] = val, test
        m0 = seq_cls_model(path, len(d["names"]))
        prefix = encoder_prefix(m0)
        if theta0 is None:
            theta0, _ = split_state_dict(copy.deepcopy(m0.state_dict()), prefix)
        train_b = tokenize(tok, *d["train"], max_length=args.max_length, batch_size=64)
        linear_probe(m0, train_b, epochs=100, device=torch.device("cpu"), seed=args.seed)
        base_acc[task] = accuracy(m0, test)
        models[task] = m0
        for name, head, lr in settings:
            m = seq_cls_model(path, len(d["names"]))
            t0 = time.monotonic()
            finetune(
                m, tok, *d["train"], steps=args.steps, batch_size=args.batch_size, lr=lr,
                weight_decay=0.0, warmup_ratio=0.1, max_length=args.max_length, device="cpu",
                seed=args.seed, head_init=head, probe_epochs=100,
            )  # fmt: skip
            enc, hd = split_state_dict(
                {k: v.detach().clone() for k, v in m.state_dict().items()}, prefix
            )
            experts[name][task], heads[name][task] = enc, hd
            exp_acc[name][task] = accuracy(m, test)
            print(
                f"[{time.monotonic() - t_start:6.0f}s] {task:18s} {name:8s} base "
                f"{base_acc[task]:.3f} expert {exp_acc[name][task]:.3f} "
                f"({time.monotonic() - t0:.0f} s)",
                flush=True,
            )

    def score(enc: dict, name: str, split: str) -> dict[str, float]:
        out = {}
        for task in args.tasks:
            m = models[task]
            load_encoder_into(m, enc)
            m.load_state_dict(heads[name][task], strict=False)
            out[task] = accuracy(m, data[task][f"{split}_b"])
        return out

    print(f"\nsteps {args.steps}, batch {args.batch_size}, max_length {args.max_length}, "
          f"n_train {args.n_train}, n_test {args.n_test}; 95 % Wilson intervals")  # fmt: skip
    for name, _, _ in settings:
        taus = {
            t: torch.cat([(e[k].float() - theta0[k].float()).flatten() for k in theta0])
            for t, e in experts[name].items()
        }
        norm0 = torch.cat([v.float().flatten() for v in theta0.values()]).norm()
        rel = {t: float(v.norm() / norm0) for t, v in taus.items()}
        cos = [
            float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0))
            for a, b in itertools.combinations(taus, 2)
        ]
        rows = {}
        for method, extra in (("task_arithmetic", {}), ("ties", {"density": 0.2})):
            best = None
            for lam in GRID:
                merged = merge(method, theta0, experts[name], scaling=lam, **extra)
                v = score(merged, name, "val")
                mean_v = sum(v.values()) / len(v)
                if best is None or mean_v > best[0]:
                    best = (mean_v, lam, merged)
            rows[method] = (best[1], score(best[2], name, "test"))
        print(f"\n== {name}: ‖τ‖/‖θ₀‖ mean {sum(rel.values()) / len(rel):.4f}, "
              f"mean pairwise cos(τ) {sum(cos) / max(1, len(cos)):.3f}")  # fmt: skip
        hdr = f"{'task':18s} {'n':>5s} {'base':>17s} {'expert':>17s}"
        for method, (lam, _) in rows.items():
            hdr += f" {method[:8] + f' λ{lam}':>17s}"
        print(hdr)
        means = {"base": [], "expert": [], **{m: [] for m in rows}}
        for task in args.tasks:
            n = len(data[task]["test"][1])
            cells = [base_acc[task], exp_acc[name][task]] + [r[1][task] for r in rows.values()]
            line = f"{task:18s} {n:5d}"
            for c in cells:
                lo, hi = wilson(round(c * n), n)
                line += f" {c:.3f} [{lo:.2f},{hi:.2f}]"
            print(line)
            means["base"].append(base_acc[task])
            means["expert"].append(exp_acc[name][task])
            for m, r in rows.items():
                means[m].append(r[1][task] / exp_acc[name][task])
        k = len(args.tasks)
        print(f"mean base {sum(means['base']) / k:.3f}  mean expert {sum(means['expert']) / k:.3f}"
              f"  (expert - base {(sum(means['expert']) - sum(means['base'])) / k:+.3f})")  # fmt: skip
        for m in rows:
            print(f"  {m:16s} mean normalized {sum(means[m]) / k:.3f}")
        nb = [base_acc[t] / exp_acc[name][t] for t in args.tasks]
        print(f"  {'base':16s} mean normalized {sum(nb) / k:.3f}")
    print(f"\ntotal {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
