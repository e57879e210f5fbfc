"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from pydantic import Field

from mergeflow.methods.chunks import StateDictSource, TensorInputs, column_chunks, stacked
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.tensors import MergeError, StateDict, check_compatible, is_mergeable

PAPER = (
    "Huang, Ye, Li, Lin, Jiang, Zhang, Ouyang. EMR-Merging: Tuning-Free High-Performance Model "
    "Merging. NeurIPS 2024 (spotlight). arXiv:2405.17461"
)

_F32 = torch.float32


class EmrParams(MethodParams):
    """Hyper-parameters of EMR-Merging (the method is tuning-free; ``scaling`` is 1 in the paper)."""

    scaling: float = Field(1.0, ge=0, description="λ applied to the unified task vector")


def elect(tau: torch.Tensor) -> torch.Tensor:
    """Unified task vector of one tensor, ``τ_uni = γ_uni ⊙ ε_uni``.

    ``γ_uni = sgn(Σ_t τ_t)``; ``ε_uni = max_{t : sgn(τ_t) = γ_uni} |τ_t|`` (0 where no task
    agrees). Huang et al., NeurIPS 2024, Eq. 2–3 ("Elect").

    Args:
        tau: ``(T, *shape)`` float32 task vectors.

    Returns:
        ``τ_uni`` of shape ``shape``.

    """
    sign = torch.sign(tau.sum(dim=0))
    agree = torch.sign(tau) == sign
    eps = torch.where(agree, tau.abs(), torch.zeros((), dtype=tau.dtype)).amax(dim=0)
    return sign * eps


def task_mask(tau_t: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    """Task-specific mask ``M_t = 1[τ_t ⊙ τ_uni > 0]`` (Huang et al., NeurIPS 2024, Eq. 4)."""
    return (tau_t * unified) > 0


@dataclass(frozen=True)
class EmrResult:
    """Unified task vector, per-task masks and rescalers (Huang et al., NeurIPS 2024).

    Attributes:
        unified: Tensor key -> ``τ_uni`` (float32).
        masks: Task -> tensor key -> bool ``M_t``.
        rescalers: Task -> ``λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|`` (sums over all mergeable tensors).

    """

    unified: dict[str, torch.Tensor]
    masks: dict[str, dict[str, torch.Tensor]]
    rescalers: dict[str, float]


def emr_decompose(
    base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]]
) -> EmrResult:
    """Elect the unified task vector, then compute every task's mask and rescaler.

    ``τ_uni`` by :func:`elect`; ``M_t = 1[τ_t ⊙ τ_uni > 0]``;
    ``λ_t = Σ_k |τ_t[k]| / Σ_k |M_t[k] ⊙ τ_uni[k]|`` over the whole model (1 where the
    denominator is 0). Huang et al., "EMR-Merging" (NeurIPS 2024), Eq. 2–6.

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict.

    Returns:
        :class:`EmrResult`.

    Raises:
        MergeError: On incompatible experts (see :func:`~mergeflow.tensors.check_compatible`).

    """
    check_compatible(base, experts)
    source = StateDictSource(base, experts)
    tasks = source.tasks
    unified: dict[str, torch.Tensor] = {}
    masks: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    num = torch.zeros(len(tasks), dtype=torch.float64)
    den = torch.zeros(len(tasks), dtype=torch.float64)
    for name in source.names:
        tau = stacked(source.inputs(name))
        uni = elect(tau)
        unified[name] = uni
        for i, t in enumerate(tasks):
            m = task_mask(tau[i], uni)
            masks[t][name] = m
            num[i] += float(tau[i].abs().sum(dtype=torch.float64))
            den[i] += float((uni.abs() * m).sum(dtype=torch.float64))
    rescalers = {
        t: float(num[i] / den[i]) if float(den[i]) > 0 else 1.0 for i, t in enumerate(tasks)
    }
    return EmrResult(unified=unified, masks=masks, rescalers=rescalers)


def emr_task_model(base: Mapping[str, torch.Tensor], result: EmrResult, task: str) -> StateDict:
    """Task-specific model ``θ_t = θ_0 + λ_t · (M_t ⊙ τ_uni)`` (Huang et al., NeurIPS 2024, Eq. 7).

    Computed in float32, written in the base dtypes; non-mergeable tensors copied from ``base``.

    Args:
        base: Pre-trained state dict ``θ_0``.
        result: Output of :func:`emr_decompose`.
        task: Task name.

    Returns:
        The task's state dict.

    Raises:
        MergeError: If ``task`` is unknown.

    """
    if task not in result.masks:
        raise MergeError(f"EMR: unknown task '{task}' (tasks: {', '.join(result.masks)})")
    lam = result.rescalers[task]
    out: StateDict = {}
    for name, b in base.items():
        if not is_mergeable(name, b):
            out[name] = b.clone()
            continue
        d = result.unified[name] * result.masks[task][name]
        out[name] = (b.to(_F32) + lam * d).to(b.dtype)
    return out


def emr_task_models(
    base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, StateDict]:
    """Every task's EMR model, ``task -> θ_0 + λ_t · (M_t ⊙ τ_uni)``.

    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging" (NeurIPS 2024).

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict.

    Returns:
        Task -> state dict in ``base``'s dtypes.

    """
    res = emr_decompose(base, experts)
    return {t: emr_task_model(base, res, t) for t in experts}


@register("emr", EmrParams, paper=PAPER)
def emr(inp: TensorInputs, params: EmrParams, ctx: None = None) -> torch.Tensor:
    """EMR-Merging's unified task vector of one tensor, ``τ_uni`` (:func:`elect`).

    ``τ_uni = sgn(Σ_t τ_t) ⊙ max_{t agreeing} |τ_t|`` (Elect); the unified model is
    ``θ_uni = θ_0 + λ · τ_uni``. The per-task masks ``M_t`` and rescalers ``λ_t`` that turn it
    into task-specific models are produced by :func:`emr_decompose` / :func:`emr_task_models`.
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging" (NeurIPS 2024).
    Element-wise, so it runs on ``(T, CHUNK)`` column chunks.

    Args:
        inp: The tensor's base value and expert readers.
        params: ``scaling`` (λ, 1 in the paper; applied by the caller).
        ctx: Unused.

    Returns:
        Flat float32 ``τ_uni``.

    """
    out = torch.empty(inp.base.numel(), dtype=torch.float32, device=inp.base.device)
    for s, tau in column_chunks(inp):
        out[s] = elect(tau)
    return out
