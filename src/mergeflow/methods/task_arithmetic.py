"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergeflow.methods.chunks import BaseF32, Source, TensorInputs, ranges, task_slice
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.tensors import per_task

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


def task_weights(params: TaskArithmeticParams, source: Source) -> dict[str, float]:
    """``task -> w_t`` (1 each unless ``weights`` is given).

    Raises:
        MergeError: If ``weights`` misses a task or names an unknown one.

    """
    return per_task(params.weights, source.tasks, "weights", 1.0)


@register("task_arithmetic", TaskArithmeticParams, paper=PAPER, prepare=task_weights)
def task_arithmetic(
    inp: TensorInputs, params: TaskArithmeticParams, weights: dict[str, float]
) -> torch.Tensor:
    """Sum of weighted task vectors of one tensor, ``τ_merged = Σ_t w_t τ_t``.

    ``τ_t = θ_t − θ_0``; the merged model is ``θ = θ_0 + λ Σ_t w_t τ_t``. Ilharco et al.,
    "Editing Models with Task Arithmetic" (ICLR 2023). Accumulated expert by expert in float32
    chunks (one expert's tensor read at a time).

    Args:
        inp: The tensor's base value and expert readers.
        params: ``scaling`` (λ, applied by the caller) and ``weights``.
        weights: ``task -> w_t`` from :func:`task_weights`.

    Returns:
        Flat float32 ``τ_merged``.

    """
    bf = BaseF32(inp.base)
    acc = torch.zeros(bf.numel(), dtype=torch.float32, device=bf.device)
    for i, t in enumerate(inp.tasks):
        e = inp.expert(i).reshape(-1)
        for s in ranges(bf.numel()):
            acc[s].add_(task_slice(e, bf, s), alpha=weights[t])
    return acc
