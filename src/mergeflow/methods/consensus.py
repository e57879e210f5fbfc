"""Consensus merging with TALL masks (Wang et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated

import torch
from pydantic import Field

from mergeflow.masks.tall import tall_mask_stack
from mergeflow.methods.registry import (
    MethodParams,
    assemble,
    mergeable_keys,
    per_task,
    register,
    stacked_deltas,
)
from mergeflow.tensors import StateDict

PAPER = (
    "Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard. Localizing Task Information for "
    "Improved Model Merging and Compression. ICML 2024. arXiv:2405.07813"
)

NonNegFloat = Annotated[float, Field(ge=0)]


class ConsensusParams(MethodParams):
    """Hyper-parameters of consensus merging."""

    scaling: float = Field(0.3, ge=0, description="α applied to the masked multi-task vector")
    k: int = Field(2, ge=0, description="minimum number of tasks whose TALL mask selects a weight")
    tall_lambda: NonNegFloat | dict[str, NonNegFloat] = Field(
        0.4, description="TALL λ >= 0, one float for all tasks or a dict with one per task"
    )


@register("consensus", ConsensusParams, paper=PAPER)
def consensus(
    base: StateDict, experts: Mapping[str, StateDict], params: ConsensusParams
) -> StateDict:
    """Consensus merging: keep only weights at least ``k`` tasks find important.

    ``τ_MTL = Σ_t τ_t``; TALL masks ``m_t = 1[|τ_t| ≥ λ_t |τ_MTL − τ_t|]``; consensus mask
    ``m = 1[Σ_t m_t ≥ k]``; ``θ = θ_0 + α (m ⊙ τ_MTL)``. Wang et al., "Localizing Task
    Information for Improved Model Merging and Compression" (ICML 2024). This is the paper's
    formula on task vectors (FusionBench passes task vectors where fine-tuned weights are
    expected). Computed one tensor at a time in float32.

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict (already validated).
        params: ``scaling`` (α), ``k``, ``tall_lambda`` (λ or per-task λ_t).

    Returns:
        Merged state dict in ``base``'s dtypes.

    Raises:
        MergeError: If a per-task ``tall_lambda`` dict misses a task or names an unknown one.

    """
    tasks = list(experts)
    lam_map = per_task(params.tall_lambda, tasks, "tall_lambda", 0.4)
    lam = torch.tensor([lam_map[t] for t in tasks], dtype=torch.float32)

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for name in mergeable_keys(base):
            tau = stacked_deltas(base, experts, name)
            mtl = tau.sum(dim=0)
            count = tall_mask_stack(tau, lam, mtl).sum(dim=0)
            del tau
            yield name, mtl.masked_fill_(count < params.k, 0.0)

    return assemble(base, deltas(), params.scaling)
