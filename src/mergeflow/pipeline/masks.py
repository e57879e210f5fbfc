"""Stage ``masks``: TALL masks with λ_t chosen per task on validation, plus the consensus mask.

TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
ICML 2024): m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|] with τ_MTL = Σ_t τ_t, so that
θ_t ≈ θ_0 + m_t ⊙ τ_MTL. λ_t is picked from ``masks.lambdas`` by a validation score of that
reconstruction. The consensus mask keeps weights that at least k tasks' masks keep.

λ_t selection (``masks.select``): the paper picks the λ with the best validation accuracy. The
default here is ``agreement``: the share of validation inputs on which the reconstruction predicts
what the expert itself predicts (ties broken by accuracy, then by the smaller λ). Compression is
meant to reproduce the expert; agreement measures that directly and, on a small validation split,
varies far less between candidates than accuracy does (a few flipped labels of a near-chance expert
decide an accuracy comparison, while agreement counts every changed prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import tensors
from mergeflow.config import Params
from mergeflow.io import atomic_dir, save_state_dict, write_json_atomic
from mergeflow.masks import consensus_mask, pack_masks, tall_masks_from_vectors
from mergeflow.pipeline.context import MergeContext
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    data: Path
    base: Path
    experts: Path
    task_vectors: Path
    out: Path


def masked_expert(base: dict, mtl: dict, mask: dict) -> dict:
    """θ_0 + m ⊙ τ_MTL (the TALL reconstruction of one expert)."""
    return tensors.apply(base, {k: mtl[k] * mask[k] for k in mask}, 1.0)


def density(mask: dict[str, torch.Tensor]) -> float:
    """Fraction of ones in a mask over all its tensors."""
    on = sum(int(m.sum()) for m in mask.values())
    return on / max(1, sum(m.numel() for m in mask.values()))


@dataclass(frozen=True)
class LambdaGrid:
    """Validation scores of every candidate λ per task: ``{task: {str(λ): score}}``."""

    accuracy: dict[str, dict[str, float]]
    agreement: dict[str, dict[str, float]]

    def choose(self, rule: str = "agreement") -> dict[str, float]:
        """λ_t per task: best ``rule`` score, then the other score, then the smaller λ."""
        first, second = (
            (self.agreement, self.accuracy) if rule == "agreement" else (self.accuracy, self.agreement)
        )
        return {
            t: float(max(first[t], key=lambda k, t=t: (first[t][k], second[t][k], -float(k))))
            for t in first
        }


def lambda_grid(
    ctx: MergeContext,
    task_vectors: dict[str, dict[str, torch.Tensor]],
    val: dict,
    lambdas: tuple[float, ...],
    mtl: dict[str, torch.Tensor],
) -> LambdaGrid:
    """Score the TALL reconstruction of every task in ``task_vectors`` for each candidate λ.

    Args:
        ctx: Base weights and the experts' task models (heads).
        task_vectors: τ_t of the tasks to mask (τ_MTL is their sum).
        val: Tokenized validation batches per task.
        lambdas: Candidate λ values.
        mtl: τ_MTL, the sum of ``task_vectors``.

    Returns:
        Validation accuracy and agreement with the expert's own predictions, per task and λ.
    """
    ref = {
        t: ctx.predictions(tensors.apply(ctx.base, tv, 1.0), val[t], t)[0]
        for t, tv in task_vectors.items()
    }
    acc: dict[str, dict[str, float]] = {t: {} for t in task_vectors}
    agree: dict[str, dict[str, float]] = {t: {} for t in task_vectors}
    for lam in lambdas:
        masks = tall_masks_from_vectors(task_vectors, lam, mtl=mtl)
        for t in task_vectors:
            pred, gold = ctx.predictions(masked_expert(ctx.base, mtl, masks[t]), val[t], t)
            acc[t][str(lam)] = float((pred == gold).float().mean())
            agree[t][str(lam)] = float((pred == ref[t]).float().mean())
    return LambdaGrid(acc, agree)


def run(cfg: Params, paths: Paths) -> dict:
    """Pick λ_t per task on validation, save bit-packed TALL masks and the consensus mask."""
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    val = ctx.batches(paths.data, "val")
    mtl = tensors.sum_all(list(ctx.task_vectors.values()))
    grid = lambda_grid(ctx, ctx.task_vectors, val, cfg.masks.lambdas, mtl)
    chosen = grid.choose(cfg.masks.select)
    masks = tall_masks_from_vectors(ctx.task_vectors, chosen, mtl=mtl)
    cons = consensus_mask(masks, k=cfg.masks.consensus_k)
    summary = {
        "lambda": chosen,
        "select": cfg.masks.select,
        "val_accuracy_grid": grid.accuracy,
        "val_agreement_grid": grid.agreement,
        "density": {t: density(m) for t, m in masks.items()},
        "consensus_density": density(cons),
        "consensus_k": cfg.masks.consensus_k,
    }
    with stage_run(
        "masks",
        {"masks": cfg.masks.model_dump(), "tasks": list(cfg.tasks)},
        inputs={"task_vectors": paths.task_vectors, "val": paths.data},
    ) as tr:
        tr.dataset("validation", "-", str(paths.data), "val: choose lambda_t")
        with atomic_dir(paths.out) as tmp:
            packed, meta = pack_masks(masks)
            save_state_dict(packed, tmp / "tall_masks.safetensors", metadata=meta)
            packed, meta = pack_masks({"consensus": cons})
            save_state_dict(packed, tmp / "consensus_mask.safetensors", metadata=meta)
            write_json_atomic(tmp / "masks.json", summary)
        tr.metrics(
            {
                "lambda": chosen,
                "density": summary["density"],
                "consensus_density": summary["consensus_density"],
            }
        )
        tr.outputs({"masks": paths.out})
    return summary
