"""Consensus merging with TALL masks (Wang et al., ICML 2024)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from mergeflow.masks.tall import tall_mask_stack
from mergeflow.methods.chunks import Source, TensorInputs, column_chunks
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.tensors import per_task

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


def task_lambdas(params: ConsensusParams, source: Source) -> torch.Tensor:
    """``(T,)`` float32 TALL ``λ_t`` in task order.

    Raises:
        MergeError: If a per-task ``tall_lambda`` dict misses a task or names an unknown one.

    """
    lam = per_task(params.tall_lambda, source.tasks, "tall_lambda", 0.4)
    return torch.tensor([lam[t] for t in source.tasks], dtype=torch.float32)


@register("consensus", ConsensusParams, paper=PAPER, prepare=task_lambdas)
def consensus(inp: TensorInputs, params: ConsensusParams, lam: torch.Tensor) -> torch.Tensor:
    """Consensus merging of one tensor: keep only weights at least ``k`` tasks find important.

    ``τ_MTL = Σ_t τ_t``; TALL masks ``m_t = 1[|τ_t| ≥ λ_t |τ_MTL − τ_t|]``; consensus mask
    ``m = 1[Σ_t m_t ≥ k]``; ``τ_merged = m ⊙ τ_MTL`` and ``θ = θ_0 + α τ_merged``. Wang et al.,
    "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024). This
    is the paper's formula on task vectors (FusionBench passes task vectors where fine-tuned
    weights are expected). Element-wise, so it runs on ``(T, CHUNK)`` column chunks.

    Args:
        inp: The tensor's base value and expert readers.
        params: ``scaling`` (α, applied by the caller), ``k``, ``tall_lambda``.
        lam: ``(T,)`` ``λ_t`` from :func:`task_lambdas`.

    Returns:
        Flat float32 ``τ_merged``.

    """
    out = torch.empty(inp.base.numel(), dtype=torch.float32, device=inp.base.device)
    for s, tau in column_chunks(inp):
        mtl = tau.sum(dim=0)
        count = tall_mask_stack(tau, lam, mtl).sum(dim=0)
        out[s] = mtl.masked_fill_(count < params.k, 0.0)
    return out
