"""Stage ``coefficients``: validation grid search of each merge method's scaling coefficient λ.

For every method in ``evaluate.methods``, θ(λ) = merge(θ_0, {θ_t}; scaling=λ) is scored on the
validation split of every task and the λ with the best mean accuracy is kept (ties: smaller λ).
Methods that take TALL λ_t (consensus) get the per-task λ_t the masks stage chose on validation.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from mergeflow import methods
from mergeflow.config import Params
from mergeflow.io import atomic_dir, write_bytes_atomic, write_json_atomic
from mergeflow.pipeline.artifacts import experts_from_vectors
from mergeflow.pipeline.context import MergeContext
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    data: Path
    base: Path
    experts: Path
    task_vectors: Path
    masks: Path
    out: Path
    plot: Path


def method_hyperparams(cfg: Params, name: str, masks_dir: Path) -> dict:
    """The fixed hyperparameters of ``name`` from params, plus λ_t from the masks stage if it takes them."""
    hp = dict(cfg.evaluate.methods[name])
    if "tall_lambda" in methods.get(name).params_model.model_fields and "tall_lambda" not in hp:
        hp["tall_lambda"] = json.loads((Path(masks_dir) / "masks.json").read_text())["lambda"]
    return hp


def run(cfg: Params, paths: Paths) -> dict:
    """Search λ per method; write ``coefficients.json`` and a CSV for ``dvc plots``."""
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    val = ctx.batches(paths.data, "val")
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    result, rows = {}, []
    for name in cfg.evaluate.methods:
        hp = method_hyperparams(cfg, name, paths.masks)
        scores = {}
        for lam in cfg.coefficients.grid:
            acc = ctx.score(methods.merge(name, ctx.base, experts, scaling=lam, **hp), val)
            scores[lam] = sum(acc.values()) / len(acc)
            rows.append({"method": name, "scaling": lam, "val_mean_accuracy": scores[lam]})
        best = max(scores, key=lambda lam: (scores[lam], -lam))
        result[name] = {"scaling": best, "val_mean_accuracy": scores[best], "hyperparams": hp}
    with stage_run(
        "coefficients",
        {"coefficients": cfg.coefficients.model_dump(), "evaluate.methods": cfg.evaluate.methods},
        inputs={"task_vectors": paths.task_vectors, "masks": paths.masks},
    ) as tr:
        tr.dataset("validation", "-", str(paths.data), "val: grid search of scaling")
        with atomic_dir(paths.out) as tmp:
            write_json_atomic(tmp / "coefficients.json", result)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["method", "scaling", "val_mean_accuracy"])
        w.writeheader()
        w.writerows(rows)
        write_bytes_atomic(paths.plot, buf.getvalue().encode())
        tr.metrics({f"{m}.scaling": r["scaling"] for m, r in result.items()})
        tr.metrics({f"{m}.val_mean_accuracy": r["val_mean_accuracy"] for m, r in result.items()})
        tr.outputs({"coefficients": paths.out})
    return result
