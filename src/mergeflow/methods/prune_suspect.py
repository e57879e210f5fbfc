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

import torch
from pydantic import Field

from mergeflow.methods.chunks import Source, TensorInputs, stacked
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.tensors import MergeError, magnitude_threshold

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


def pruned_tasks(params: PruneSuspectParams, source: Source) -> list[int]:
    """Indices of the experts whose top entries are pruned (the suspect, or all of them).

    Raises:
        MergeError: ``suspect`` names no expert.

    """
    if params.suspect is None:
        return list(range(len(source.tasks)))
    if params.suspect not in source.tasks:
        raise MergeError(
            f"prune_suspect: suspect {params.suspect!r} is not one of the experts ({source.tasks})"
        )
    return [source.tasks.index(params.suspect)]


@register("prune_suspect", PruneSuspectParams, paper=PAPER, prepare=pruned_tasks)
def prune_suspect(inp: TensorInputs, params: PruneSuspectParams, pruned: list[int]) -> torch.Tensor:
    """Task arithmetic of one tensor after zeroing the suspects' top-``top`` entries (module doc).

    ``τ_merged = Σ_{t ∉ S} τ_t + Σ_{s ∈ S} τ_s ⊙ 1[|τ_s| < thr_s]``, ``thr_s`` the ``(1 − top)``
    quantile of ``|τ_s|`` in this tensor (:func:`~mergeflow.tensors.magnitude_threshold`).

    Args:
        inp: The tensor's base value and expert readers.
        params: ``suspect``, ``top``, ``scaling`` (λ, applied by the caller).
        pruned: Expert indices from :func:`pruned_tasks`.

    Returns:
        ``τ_merged`` (the base tensor's shape), float32.

    """
    tau = stacked(inp)
    for i in pruned:
        row = tau[i]
        if row.numel():
            row.masked_fill_(row.abs() >= magnitude_threshold(row, params.top), 0.0)
    return tau.sum(0)
