"""Backdoor baseline: prune the suspected expert's largest task-vector entries, then add.

A simple defence against a poisoned expert (the baseline the merge-safety audit compares DAM
with): backdoor fine-tuning concentrates in few, large weight changes (fine-pruning, Liu et al.,
"Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018; the
outlier cut of Model Breadcrumbs, Davari & Belilovsky, 2023), so the top-``top`` fraction of the
suspect's |τ| is removed before task arithmetic (Ilharco et al., ICLR 2023):

    θ = θ_0 + λ (Σ_{t ≠ s} τ_t + τ_s ⊙ 1[|τ_s| < thr_s]),

thr_s the (1 − top) quantile of |τ_s| within each tensor (per layer, as fine-pruning prunes per
layer; per-tensor statistics also let the streaming engine run it tensor by tensor).
``suspect: null`` treats every expert as suspect (each loses its own top fraction).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from pydantic import Field

from mergeflow.methods.registry import (
    MethodParams,
    assemble,
    mergeable_keys,
    register,
    stacked_deltas,
)
from mergeflow.tensors import MergeError, StateDict, magnitude_threshold

PAPER = (
    "Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural "
    "Networks. RAID 2018; baseline of Yang et al., Mitigating the Backdoor Effect for Multi-Task "
    "Model Merging via Safety-Aware Subspace, ICLR 2025 (arXiv:2410.13910)"
)


class PruneSuspectParams(MethodParams):
    """Hyper-parameters of the prune-the-suspect baseline."""

    suspect: str | None = Field(
        None, description="task whose expert is suspected (null: every expert is pruned)"
    )
    top: float = Field(
        0.01, gt=0, lt=1, description="fraction of the suspect's largest |τ| entries removed"
    )
    scaling: float = Field(0.3, ge=0, description="λ applied to the summed task vectors")


@register("prune_suspect", PruneSuspectParams, paper=PAPER)
def prune_suspect(
    base: StateDict, experts: Mapping[str, StateDict], params: PruneSuspectParams
) -> StateDict:
    """Task arithmetic after zeroing the suspect's top-``top`` magnitude entries (module doc).

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict (already validated).
        params: ``suspect``, ``top``, ``scaling`` (λ).

    Returns:
        Merged state dict in ``base``'s dtypes.

    Raises:
        MergeError: ``suspect`` names no expert.
    """
    tasks = list(experts)
    if params.suspect is not None and params.suspect not in experts:
        raise MergeError(
            f"prune_suspect: suspect {params.suspect!r} is not one of the experts ({tasks})"
        )
    pruned = [tasks.index(params.suspect)] if params.suspect is not None else range(len(tasks))

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for name in mergeable_keys(base):
            tau = stacked_deltas(base, experts, name)
            for i in pruned:
                row = tau[i]
                if row.numel():
                    row.masked_fill_(row.abs() >= magnitude_threshold(row, params.top), 0.0)
            yield name, tau.sum(0)

    return assemble(base, deltas(), params.scaling)
