"""Can the ci profile's e2e assertions hold? Base vs expert, and the backdoor, in-process.

Measures, on the splits the ci profile draws (configs/ci.yaml: seed 0, 256 train / 200 test
texts, 32 tokens), what ``tests/e2e`` asserts on the pipeline's own run, without the pipeline:

- per task: test accuracy of the base (θ_0 + a linear probe, ``finetune.probe_epochs`` full-batch
  steps) and of the LP-FT expert (``finetune.steps`` steps), each with its 95 % Wilson interval
  (``mergeflow.stats.wilson``) — an expert "beats the base beyond the noise" when they are disjoint;
- the poisoned task (``safety.poison``, ``threat: encoder``): the attack success rate of θ_0 under
  the clean frozen head and of the expert trained with that head on the poisoned split.

Usage: ``python benchmarks/ci_profile.py [--tasks a b] [--steps 60] [--no-backdoor]``
(docs/reliability.md, "The ci profile"). Seconds per fine-tune are printed (wall, this machine).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "tweet_sentiment", "bbc_news"])
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--poison-task", default="rotten_tomatoes")
    ap.add_argument("--trigger", default="cf")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--no-backdoor", action="store_true")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from mergeflow.data import load_task, make_splits
    from mergeflow.models.hf import offline_env, resolve_model_path, seq_cls_model
    from mergeflow.models.inference import accuracy, predict, tokenize
    from mergeflow.models.train import finetune, linear_probe
    from mergeflow.safety.poison import PoisonSpec, clean_rows, poison_split, triggered_test
    from mergeflow.safety.threat import fit_clean_head, freeze_head
    from mergeflow.stats import wilson

    offline_env()
    path = resolve_model_path("packaged:all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    ft = dict(batch_size=a.batch_size, lr=a.lr, weight_decay=0.0, warmup_ratio=0.1,
              max_length=a.max_length, device="cpu", seed=0)  # fmt: skip

    def ci(acc: float, n: int) -> str:
        lo, hi = wilson(round(acc * n), n)
        return f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"

    for task in a.tasks:
        texts, labels, names = load_task(task)
        sp = make_splits(texts, labels, seed=0, n_train=a.n_train, n_val=32, n_test=a.n_test)
        tr = ([r["text"] for r in sp["train"]], [r["label"] for r in sp["train"]])
        te = ([r["text"] for r in sp["test"]], [r["label"] for r in sp["test"]])
        teb = tokenize(tok, *te, max_length=a.max_length, batch_size=64)
        n = len(te[1])
        m = seq_cls_model(path, len(names), tuple(names))
        trb = tokenize(tok, *tr, max_length=a.max_length, batch_size=64)
        linear_probe(m, trb, epochs=a.probe_epochs, device="cpu", seed=0)
        base = accuracy(m, teb)
        m = seq_cls_model(path, len(names), tuple(names))
        t0 = time.time()
        finetune(m, tok, *tr, steps=a.steps, probe_epochs=a.probe_epochs, **ft)
        dt = time.time() - t0
        print(f"{task}: base {ci(base, n)}  expert {ci(accuracy(m, teb), n)}  ({dt:.0f} s)", flush=True)

        if a.no_backdoor or task != a.poison_task:
            continue
        spec = PoisonSpec(trigger=a.trigger, rate=a.rate, target=0, seed=0, max_position=8,
                          threat="encoder")  # fmt: skip
        pt, pl, idx = poison_split(*tr, spec, len(names))
        att, _ = triggered_test(*te, spec)
        atb = tokenize(tok, att, [0] * len(att), max_length=a.max_length, batch_size=64)

        def asr(model, atb=atb, target=spec.target) -> float:
            p, _ = predict(model, atb)
            return float((p == target).float().mean())

        m = seq_cls_model(path, len(names), tuple(names))
        fit_clean_head(m, tok, *clean_rows(pt, pl, spec), max_length=a.max_length,
                       epochs=a.probe_epochs, device="cpu", seed=0)  # fmt: skip
        base_asr = asr(m)
        freeze_head(m, "classifier")
        t0 = time.time()
        finetune(m, tok, pt, pl, steps=a.steps, head_init="random", **ft)
        dt = time.time() - t0
        k = len(att)
        print(f"{task} poisoned ({len(idx)} rows, '{a.trigger}'): ASR θ_0 + clean head "
              f"{ci(base_asr, k)}  expert {ci(asr(m), k)}  clean acc {accuracy(m, teb):.3f} "
              f"({dt:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    main()
