"""Time per step and peak memory of learned merging: functional θ(α) vs a naive per-step rebuild.

    python benchmarks/learned_coefficients.py                 # MiniLM-L6 base, 8 tasks, layer-wise
    python benchmarks/learned_coefficients.py --tasks 4 --steps 5 --scheme atlas

Both variants compute the same loss (entropy of every task's predictions) and the same gradient
w.r.t. α, on the packaged MiniLM encoder with random task vectors and heads (no pipeline needed):

- functional (mergeflow.coefficients): θ(α) is built once per step and fed to each task model with
  ``torch.func.functional_call``; no module is copied.
- naive: each step builds the full merged state dict, then for every task deep-copies the task
  model and swaps the merged tensors in as its encoder weights (the pattern of the AdaMerging /
  FusionBench code: one merged model object per step and task).

Each variant runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own; the script prints
seconds per step, peak RSS, RSS growth over the loaded state, and the naive/functional ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(n_tasks: int, scheme: str, batch: int, seq: int):
    from transformers import AutoModelForSequenceClassification

    from mergeflow import coefficients as lc
    from mergeflow.config import PACKAGED_MINILM
    from mergeflow.models.hf import offline_env, resolve_model_path, split_state_dict

    offline_env()
    torch.manual_seed(0)
    path = resolve_model_path(PACKAGED_MINILM)
    models = {
        f"t{i}": AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        for i in range(n_tasks)
    }
    first = next(iter(models.values()))
    prefix = first.base_model_prefix
    base, _ = split_state_dict(first.state_dict(), prefix)
    base = {k: v.clone() for k, v in base.items()}
    tvs = {
        t: {k: 1e-3 * torch.randn_like(v) for k, v in base.items() if v.is_floating_point()}
        for t in models
    }
    for m in models.values():
        m.requires_grad_(False)
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme(scheme, 4, 0))
    inputs = {
        "input_ids": torch.randint(1000, 20000, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    return lc, fm, models, prefix, inputs


def _swap_in(model, prefix: str, encoder: dict[str, torch.Tensor]) -> None:
    """Replace the encoder's parameters of ``model`` by (non-leaf) tensors, in place."""
    for k, v in encoder.items():
        mod = model.get_submodule(prefix)
        *path, leaf = k.split(".")
        for p in path:
            mod = getattr(mod, p)
        if leaf in mod._parameters:
            del mod._parameters[leaf]
            setattr(mod, leaf, v)
        elif leaf in mod._buffers:
            mod._buffers[leaf] = v


def worker(variant: str, n_tasks: int, steps: int, scheme: str, batch: int, seq: int) -> dict:
    """Run ``steps`` optimisation steps of one variant; return timings and memory."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lc, fm, models, prefix, inputs = _setup(n_tasks, scheme, batch, seq)
    alpha = fm.full_alpha(0.3).requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=1e-3)
    loaded = _rss_mb()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        enc = fm.merged(alpha)
        loss = 0.0
        for m in models.values():
            if variant == "functional":
                logits = lc.functional_logits(m, prefix, enc, inputs)
            else:
                copy_ = copy.deepcopy(m)
                _swap_in(copy_, prefix, enc)
                logits = copy_(**inputs).logits
            logp = logits.log_softmax(-1)
            loss = loss - (logp.exp() * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "s_per_step": sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0],
        "peak_rss_mb": _rss_mb(),
        "loaded_rss_mb": loaded,
        "alpha_numel": alpha.numel(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="first step is warm-up (not timed)")
    ap.add_argument("--scheme", default="layer", choices=["task", "layer", "atlas"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--worker", choices=["functional", "naive"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.tasks, a.steps, a.scheme, a.batch, a.seq)))
        return
    res = {}
    for variant in ("functional", "naive"):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", variant]
            + [f"--{k}={v}" for k, v in vars(a).items() if k != "worker"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    print(
        f"MiniLM-L6 encoder, {a.tasks} tasks, scheme {a.scheme} "
        f"({res['functional']['alpha_numel']} coefficients), batch {a.batch}×{a.seq} tokens "
        f"per task, {a.steps - 1} timed steps, torch threads {torch.get_num_threads()}"
    )
    print(f"{'variant':11s} {'s/step':>8s} {'peak RSS MB':>12s} {'growth over loaded MB':>22s}")
    for v, r in res.items():
        growth = r["peak_rss_mb"] - r["loaded_rss_mb"]
        print(f"{v:11s} {r['s_per_step']:8.2f} {r['peak_rss_mb']:12.0f} {growth:22.0f}")
    f, n = res["functional"], res["naive"]
    print(
        f"ratio naive/functional: time {n['s_per_step'] / f['s_per_step']:.2f}×, "
        f"peak RSS {n['peak_rss_mb'] / f['peak_rss_mb']:.2f}×, growth "
        f"{(n['peak_rss_mb'] - n['loaded_rss_mb']) / max(f['peak_rss_mb'] - f['loaded_rss_mb'], 1):.2f}×"
    )


if __name__ == "__main__":
    main()
