"""Stage ``compress``: the TALL-mask archive (θ_0, τ_MTL, bit-packed masks, heads) and its size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeflow import tensors
from mergeflow.compression import archive_bytes, write_archive
from mergeflow.config import Params
from mergeflow.io import write_json_atomic
from mergeflow.pipeline.artifacts import (
    expert_prefix,
    load_expert,
    load_task_vectors,
    weights_file,
)
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    base: Path
    experts: Path
    task_vectors: Path
    masks: Path
    out: Path
    metrics: Path


def run(cfg: Params, paths: Paths) -> dict:
    """Write the archive and report bytes on disk against storing every expert."""
    tasks = list(cfg.tasks)
    mtl = tensors.sum_all(list(load_task_vectors(paths.task_vectors, tasks).values()))
    heads = {}
    for t in tasks:
        d = Path(paths.experts) / t
        heads[t] = load_expert(d, expert_prefix(d))[1]
    with stage_run(
        "compress", {"tasks": tasks}, inputs={"base": paths.base, "masks": paths.masks}
    ) as tr:
        write_archive(
            paths.out,
            weights_file(paths.base),
            mtl,
            Path(paths.masks) / "tall_masks.safetensors",
            heads,
        )
        experts_bytes = sum(weights_file(Path(paths.experts) / t).stat().st_size for t in tasks)
        compressed = archive_bytes(paths.out)
        metrics = {
            "bytes_compressed": compressed,
            "bytes_experts": experts_bytes,
            "ratio": compressed / experts_bytes,
            "n_tasks": len(tasks),
        }
        write_json_atomic(paths.metrics, metrics)
        tr.metrics(metrics)
        tr.outputs({"archive": paths.out})
    return metrics
