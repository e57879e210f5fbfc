"""Stage ``task_vectors``: τ_t = θ_t − θ_0 for every expert (LoRA: dense ΔW = B·A·α/r)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import tensors
from mergeflow.config import Params
from mergeflow.io import atomic_dir, save_state_dict
from mergeflow.models.lora import lora_delta, read_adapter
from mergeflow.pipeline.artifacts import expert_prefix, load_base_encoder, load_expert
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    base: Path
    experts: Path
    out: Path


def expert_task_vector(base: dict[str, torch.Tensor], expert_dir: Path) -> dict[str, torch.Tensor]:
    """τ of one expert dir: from its LoRA adapter if it has one, else θ_t − θ_0."""
    prefix = expert_prefix(expert_dir)
    if (expert_dir / "adapter").is_dir():
        sd, cfg = read_adapter(expert_dir / "adapter")
        delta = lora_delta(sd, cfg, prefix, base)  # DoRA: τ depends on the base weights
        unknown = sorted(set(delta) - set(base))
        if unknown:
            raise tensors.MergeError(
                f"{expert_dir}: LoRA targets tensors not in the base: {unknown[:3]}"
            )
        return {
            k: delta.get(k, torch.zeros(v.shape))
            for k, v in base.items()
            if tensors.is_mergeable(k, v)
        }
    enc, _ = load_expert(expert_dir, prefix)
    tensors.check_compatible(base, {expert_dir.name: enc})
    return tensors.task_vector(base, enc)


def run(cfg: Params, paths: Paths) -> None:
    """Write ``<out>/<task>.safetensors`` for every task in ``cfg.tasks``."""
    base = load_base_encoder(paths.base)
    params = {"tasks": list(cfg.tasks), "finetune.mode": cfg.finetune.mode}
    with stage_run(
        "task_vectors", params, inputs={"base": paths.base, "experts": paths.experts}
    ) as tr:
        norms = {}
        with atomic_dir(paths.out) as tmp:
            for t in cfg.tasks:
                tv = expert_task_vector(base, Path(paths.experts) / t)
                norms[f"norm.{t}"] = float(
                    torch.sqrt(sum((v.float() ** 2).sum() for v in tv.values()))
                )
                save_state_dict(
                    tv, tmp / f"{t}.safetensors", metadata={"task": t, "kind": "task_vector"}
                )
        tr.metrics(norms)
        tr.outputs({"task_vectors": paths.out})
