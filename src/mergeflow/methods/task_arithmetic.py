"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from pydantic import Field

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
    "Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi. "
    "Editing Models with Task Arithmetic. ICLR 2023. arXiv:2212.04089"
)


class TaskArithmeticParams(MethodParams):
    """Hyper-parameters of task arithmetic."""

    scaling: float = Field(0.3, ge=0, description="λ applied to the summed task vectors")
    weights: dict[str, float] | None = Field(
        None,
        description="optional per-task weight w_t (negative = task negation); default 1 each",
    )


@register("task_arithmetic", TaskArithmeticParams, paper=PAPER)
def task_arithmetic(
    base: StateDict, experts: Mapping[str, StateDict], params: TaskArithmeticParams
) -> StateDict:
    """Merge by adding scaled task vectors, ``θ = θ_0 + λ Σ_t w_t τ_t``.

    ``τ_t = θ_t − θ_0``; ``w_t = 1`` unless ``weights`` is given. Ilharco et al., "Editing
    Models with Task Arithmetic" (ICLR 2023). Computed one tensor at a time in float32.

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict (already validated).
        params: ``scaling`` (λ) and optional per-task ``weights``.

    Returns:
        Merged state dict in ``base``'s dtypes.

    Raises:
        MergeError: If ``weights`` misses a task or names an unknown one.

    """
    w = per_task(params.weights, experts, "weights", 1.0)
    wt = torch.tensor([w[t] for t in experts], dtype=torch.float32)

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for name in mergeable_keys(base):
            tau = stacked_deltas(base, experts, name)
            yield name, torch.tensordot(wt.to(tau.device), tau, dims=([0], [0]))

    return assemble(base, deltas(), params.scaling)
