"""Does encoding a sentence-pair task as a pair help its expert? One expert per task, cheap.

For each task: seeded stratified splits, the base's linear probe (frozen MiniLM features, the
pipeline's ``linear_probe``), one fully fine-tuned expert (``finetune``, random head), and test
accuracy with 95 % Wilson intervals against the majority class. ``vitaminc_pair`` (claim and
evidence encoded as a pair) against ``vitaminc`` (one concatenated text) at the same settings.

    nice -n 19 python benchmarks/pair_tasks.py --tasks vitaminc_pair vitaminc --out pair.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from mergeflow.data import is_pair, load_task, make_splits
from mergeflow.models.hf import offline_env, resolve_model_path, seq_cls_model
from mergeflow.models.inference import accuracy, encode, tokenize
from mergeflow.models.train import finetune, linear_probe
from mergeflow.stats import wilson


def _cell(acc: float, n: int) -> dict:
    lo, hi = wilson(round(acc * n), n)
    return {"accuracy": round(acc, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["vitaminc_pair", "vitaminc"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--head-init", default="random", choices=["random", "linear_probe"])
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    offline_env()
    from transformers import AutoTokenizer

    path = resolve_model_path("packaged:all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    results = {"settings": vars(args), "tasks": {}}
    for task in args.tasks:
        t0 = time.monotonic()
        texts, labels, names = load_task(task)
        s = make_splits(
            texts,
            labels,
            seed=args.seed,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
        )
        (tr_x, tr_y), (te_x, te_y) = (
            ([r["text"] for r in s[k]], [r["label"] for r in s[k]]) for k in ("train", "test")
        )
        lengths = [len(ids) for ids in encode(tok, te_x, max_length=10_000)["input_ids"]]
        truncated = sum(n > args.max_length for n in lengths) / len(lengths)
        train_b = tokenize(tok, tr_x, tr_y, max_length=args.max_length, batch_size=64)
        test_b = tokenize(tok, te_x, te_y, max_length=args.max_length, batch_size=64)
        probe = seq_cls_model(path, len(names))
        linear_probe(probe, train_b, epochs=100, device=torch.device("cpu"), seed=args.seed)
        base = accuracy(probe, test_b)
        model = seq_cls_model(path, len(names))
        train = finetune(
            model, tok, tr_x, tr_y, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            weight_decay=0.0, warmup_ratio=0.1, max_length=args.max_length, device="cpu",
            seed=args.seed, head_init=args.head_init, probe_epochs=100,
        )  # fmt: skip
        expert = accuracy(model, test_b)
        majority = Counter(te_y).most_common(1)[0][1] / len(te_y)
        n = len(te_y)
        results["tasks"][task] = {
            "pair": is_pair(tr_x[0]),
            "classes": list(names),
            "test_truncated_share": round(truncated, 4),
            "majority": _cell(majority, n),
            "base_linear_probe": _cell(base, n),
            "expert": _cell(expert, n),
            "final_train_loss": round(sum(train.losses[-10:]) / 10, 4),
            "seconds": round(time.monotonic() - t0),
        }
        print(json.dumps({task: results["tasks"][task]}), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
