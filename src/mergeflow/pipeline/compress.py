"""Stage ``compress``: the TALL-mask archive and the Twin-Merging archive, with their sizes.

- TALL (Wang et al., ICML 2024): θ_0 + τ_MTL + one bit-packed mask per task; optionally a second
  archive with τ_MTL pruned by the consensus mask 1[Σ_t m_t ≥ k] and stored compactly.
- Twin-Merging (Lu et al., NeurIPS 2024): shared merged expert θ* + rank-k SVD exclusive parts +
  a router trained on validation inputs to tell the tasks apart.
- LoRA-LEGO (Zhao et al., ICLR 2025), when the experts are LoRA adapters: their rank-1 units
  clustered into one peft adapter of rank k (plus each task's head).

Every form is measured in bytes on disk against storing every expert (the full fine-tuned model
file of each task: encoder + head) and against one merged model (an encoder + every task's head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import compression, methods, tensors
from mergeflow.compression import lora_lego, twin
from mergeflow.config import Params
from mergeflow.io import atomic_dir, save_state_dict, write_json_atomic
from mergeflow.methods.params import check_config
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
    tall_consensus: Path
    lora_lego: Path
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


def dir_bytes(path: Path, sub: str = "") -> int:
    """Bytes on disk of every file under ``path/sub``."""
    return sum(f.stat().st_size for f in (Path(path) / sub).rglob("*") if f.is_file())


def write_lego(cfg: Params, experts_dir: Path, heads: dict, out: Path) -> dict:
    """LoRA-LEGO over the experts' adapters (``<expert>/adapter``), plus their heads.

    With full fine-tuning there are no adapters: ``out`` then holds only a manifest saying so
    (DVC needs the declared output either way).
    """
    with atomic_dir(out) as tmp:
        if cfg.finetune.mode != "lora":
            info = {"built": False, "reason": "finetune.mode is full: experts are not LoRA"}
        else:
            rank = cfg.compress.lego_rank or cfg.finetune.lora.r
            dirs = {t: Path(experts_dir) / t / "adapter" for t in cfg.tasks}
            info = lora_lego.write_adapter(dirs, tmp / "adapter", rank, seed=cfg.seed)
            info["built"] = True
            (tmp / "heads").mkdir()
            for t, h in heads.items():
                save_state_dict(h, tmp / "heads" / f"{t}.safetensors", metadata={"task": t})
        write_json_atomic(tmp / "manifest.json", info)
    return info


def storage(
    experts_bytes: int, merged_bytes: int, forms: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Bytes of each form, and its ratio to all experts and to one merged model."""
    return {
        name: {
            "bytes": b,
            "ratio": b / experts_bytes,
            "ratio_vs_merged": b / merged_bytes,
        }
        for name, b in forms.items()
    }


def run(cfg: Params, paths: Paths) -> dict:
    """Write every compressed form and report bytes on disk against the experts and a merge.

    ``ratio`` = bytes / the experts' bytes (each task's full model file); ``ratio_vs_merged`` =
    bytes / one merged model (θ_0-sized encoder + every head). TALL archives reference θ_0 unless
    ``compress.include_base``; ``bytes_with_base`` / ``ratio_with_base`` count it in.
    """
    check_config(cfg)  # the merge methods in params.yaml (see methods.params.check_config)
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
        cons_k = cfg.masks.consensus_k if c.tall_consensus else None
        with atomic_dir(paths.tall_consensus) as tmp:
            if cons_k is not None:
                compression.write_archive(
                    tmp / "archive",
                    base_file,
                    tensors.sum_all(list(ctx.task_vectors.values())),
                    Path(paths.masks) / "tall_masks.safetensors",
                    heads,
                    configs,
                    encoder_prefix=prefix,
                    mtl_dtype=c.mtl_dtype,
                    include_base=c.include_base,
                    consensus_k=cons_k,
                )
            write_json_atomic(tmp / "form.json", {"built": cons_k is not None, "k": cons_k})
        lego = write_lego(cfg, paths.experts, heads, paths.lora_lego)
        experts_bytes = sum(weights_file(Path(paths.experts) / t).stat().st_size for t in tasks)
        base_bytes = base_file.stat().st_size
        heads_bytes = dir_bytes(paths.out, "heads")
        merged_bytes = base_bytes + heads_bytes
        with_base = 0 if c.include_base else base_bytes
        tall = compression.archive_bytes(paths.out)
        forms = {"tall": tall, "tall_with_base": tall + with_base}
        if cons_k is not None:
            cons = dir_bytes(paths.tall_consensus, "archive")
            forms |= {"tall_consensus": cons, "tall_consensus_with_base": cons + with_base}
        forms["twin"] = compression.archive_bytes(paths.twin)
        if lego["built"]:  # the adapter needs θ_0 to be applied to: count it in
            forms["lora_lego"] = dir_bytes(paths.lora_lego) + base_bytes
        sizes = storage(experts_bytes, merged_bytes, forms)
        metrics = {
            "n_tasks": len(tasks),
            "bytes_experts": experts_bytes,
            "bytes_base": base_bytes,
            "bytes_heads": heads_bytes,
            "bytes_merged": merged_bytes,
            "tall": {
                **sizes["tall"],
                "bytes_with_base": forms["tall_with_base"],
                "ratio_with_base": sizes["tall_with_base"]["ratio"],
            },
            "twin": {**sizes["twin"], "rank": c.twin_rank, "router_val_accuracy": router_acc},
        }
        if cons_k is not None:
            metrics["tall_consensus"] = {
                **sizes["tall_consensus"],
                "k": cons_k,
                "bytes_with_base": forms["tall_consensus_with_base"],
                "ratio_with_base": sizes["tall_consensus_with_base"]["ratio"],
            }
        if lego["built"]:
            metrics["lora_lego"] = {
                **sizes["lora_lego"],
                "rank": lego["rank"],
                "bytes_expert_adapters": sum(
                    dir_bytes(Path(paths.experts) / t / "adapter") for t in tasks
                ),
            }
        write_json_atomic(paths.metrics, metrics)
        tr.metrics(metrics)
        tr.outputs(
            {
                "tall": paths.out,
                "twin": paths.twin,
                "tall_consensus": paths.tall_consensus,
                "lora_lego": paths.lora_lego,
            }
        )
    return metrics
