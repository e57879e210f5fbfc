"""Stage ``compress``: the TALL-mask archive and the Twin-Merging archive, with their sizes.

- TALL (Wang et al., ICML 2024): θ_0 + τ_MTL + one bit-packed mask per task.
- Twin-Merging (Lu et al., NeurIPS 2024): shared merged expert θ* + rank-k SVD exclusive parts +
  a router trained on validation inputs to tell the tasks apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import compression, methods, tensors
from mergeflow.compression import twin
from mergeflow.config import Params
from mergeflow.io import write_json_atomic
from mergeflow.pipeline.artifacts import (
    expert_prefix,
    experts_from_vectors,
    load_expert,
    weights_file,
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
    masks: Path
    coefficients: Path
    out: Path
    twin: Path
    metrics: Path


def router_data(
    ctx: MergeContext, data_root: Path, encoder: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every task's validation inputs under ``encoder``, with task ids."""
    val = ctx.batches(data_root, "val")
    feats, ids = [], []
    for i, t in enumerate(ctx.tasks):
        f = ctx.pooled_features(encoder, val[t])
        feats.append(f)
        ids.append(torch.full((len(f),), i, dtype=torch.long))
    return torch.cat(feats), torch.cat(ids)


def run(cfg: Params, paths: Paths) -> dict:
    """Write both archives and report bytes on disk against storing every expert.

    ``ratio`` = archive bytes / the experts' bytes; ``ratio_with_base`` also counts θ_0 when the
    TALL archive references it instead of storing it.
    """
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    tasks = ctx.tasks
    heads, configs = {}, {}
    for t in tasks:
        d = Path(paths.experts) / t
        prefix = expert_prefix(d)
        heads[t] = load_expert(d, prefix)[1]
        configs[t] = json.loads((d / "config.json").read_text())
    base_file = weights_file(paths.base)
    c = cfg.compress
    coef = json.loads((Path(paths.coefficients) / "coefficients.json").read_text())[c.twin_shared]
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    shared = methods.merge(
        c.twin_shared, ctx.base, experts, scaling=coef["scaling"], **coef["hyperparams"]
    )
    feats, ids = router_data(ctx, paths.data, shared)
    router = twin.train_router(feats, ids, len(tasks), epochs=c.twin_router_epochs, seed=cfg.seed)
    router_acc = float((router(feats).argmax(-1) == ids).float().mean())
    params = {"tasks": tasks, "compress": c.model_dump(), "twin_shared_scaling": coef["scaling"]}
    with stage_run("compress", params, inputs={"base": paths.base, "masks": paths.masks}) as tr:
        tr.dataset("validation", "-", str(paths.data), "val inputs: Twin-Merging router")
        compression.write_archive(
            paths.out,
            base_file,
            tensors.sum_all(list(ctx.task_vectors.values())),
            Path(paths.masks) / "tall_masks.safetensors",
            heads,
            configs,
            encoder_prefix=prefix,
            mtl_dtype=c.mtl_dtype,
            include_base=c.include_base,
        )
        twin.write_archive(
            paths.twin,
            shared,
            experts,
            heads,
            router,
            rank=c.twin_rank,
            dtype=c.twin_dtype,
            extra={"shared": c.twin_shared, "scaling": coef["scaling"], "routing": c.twin_routing},
        )
        experts_bytes = sum(weights_file(Path(paths.experts) / t).stat().st_size for t in tasks)
        tall = compression.archive_bytes(paths.out)
        tall_with_base = tall + (0 if c.include_base else base_file.stat().st_size)
        twin_bytes = compression.archive_bytes(paths.twin)
        metrics = {
            "n_tasks": len(tasks),
            "bytes_experts": experts_bytes,
            "tall": {
                "bytes": tall,
                "bytes_with_base": tall_with_base,
                "ratio": tall / experts_bytes,
                "ratio_with_base": tall_with_base / experts_bytes,
            },
            "twin": {
                "bytes": twin_bytes,
                "ratio": twin_bytes / experts_bytes,
                "router_val_accuracy": router_acc,
            },
        }
        write_json_atomic(paths.metrics, metrics)
        tr.metrics(metrics)
        tr.outputs({"tall": paths.out, "twin": paths.twin})
    return metrics
