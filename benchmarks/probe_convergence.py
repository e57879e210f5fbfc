"""Is the base's linear probe fitted? Test accuracy of θ0 + probe after 100 / 1,000 / 3,000 steps.

    python benchmarks/probe_convergence.py            # 8 default tasks, ~5 min on 2 cores

The "base" row of every evaluation is θ0 with a linear-probe head (``models.train.linear_probe``:
full-batch Adam at lr 1e-2 from a zero head, ``finetune.probe_epochs`` steps). An under-fitted
probe makes the base look worse than it is and inflates the experts' gain over it. Features are
extracted once per task (the profile's splits: 2,000 train / 1,000 test, max_length 64); each
column refits the head from zero. Prints train / test accuracy and the final training loss.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mergeflow.data import load_task, make_splits
from mergeflow.models.hf import offline_env, resolve_model_path, seq_cls_model
from mergeflow.models.inference import tokenize
from mergeflow.models.train import _head_inputs, head_module

TASKS = (
    "rotten_tomatoes tweet_sentiment bbc_news multiemo_hotels multiemo_medicine "
    "multiemo_products fever vitaminc"
).split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--steps", nargs="+", type=int, default=[100, 1000, 3000])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    offline_env()
    from transformers import AutoTokenizer

    path = resolve_model_path("packaged:all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    print("task | n_train | " + " | ".join(f"{s} steps: train / test / loss" for s in args.steps))
    for task in args.tasks:
        t0 = time.monotonic()
        texts, labels, names = load_task(task)
        s = make_splits(
            texts, labels, seed=0, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test
        )
        m = seq_cls_model(path, len(names))

        def feats(split: str, s=s, m=m) -> tuple[torch.Tensor, torch.Tensor]:
            rows = s[split]
            b = tokenize(
                tok, [r["text"] for r in rows], [r["label"] for r in rows],
                max_length=args.max_length, batch_size=64,
            )  # fmt: skip
            return _head_inputs(m, b, torch.device("cpu"))

        (xtr, ytr), (xte, yte) = feats("train"), feats("test")
        head = head_module(m)
        cells = []
        for steps in args.steps:
            for p in head.parameters():
                nn.init.zeros_(p)
            opt = torch.optim.Adam(head.parameters(), lr=1e-2)
            for _ in range(steps):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(head(xtr), ytr)
                loss.backward()
                opt.step()
            with torch.no_grad():
                tr = float((head(xtr).argmax(-1) == ytr).float().mean())
                te = float((head(xte).argmax(-1) == yte).float().mean())
            cells.append(f"{tr:.3f} / {te:.3f} / {float(loss):.3f}")
        print(f"{task} | {len(s['train'])} | " + " | ".join(cells)
              + f"  ({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
