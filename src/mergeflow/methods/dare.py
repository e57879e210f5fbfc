"""DARE: drop-and-rescale (Yu et al., "Language Models are Super Mario", ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mergeflow.methods.registry import (
    MethodParams,
    assemble,
    mergeable_keys,
    register,
    stacked_deltas,
    tensor_seed,
)
from mergeflow.methods.ties import resolve_and_merge
from mergeflow.tensors import StateDict

PAPER = (
    "Yu, Yu, Yu, Huang, Li. Language Models are Super Mario: Absorbing Abilities from "
    "Homologous Models as a Free Lunch. ICML 2024. arXiv:2311.03099"
)


class DareParams(MethodParams):
    """Hyper-parameters of DARE."""

    drop_rate: float = Field(0.9, ge=0, lt=1, description="probability p of dropping a delta")
    rescale: Literal["inverse", "l1"] = Field(
        "inverse",
        description="'inverse': multiply survivors by 1/(1-p) (paper); 'l1': rescale so each "
        "tensor's L1 norm is preserved (as mergekit does)",
    )
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic",
        description="how sparsified task vectors are combined: sum (paper) or TIES sign "
        "election + disjoint mean with no further trim (DARE-TIES)",
    )
    scaling: float = Field(1.0, ge=0, description="λ applied to the combined task vector")
    seed: int = Field(0, ge=0, description="RNG seed; results are deterministic given it")


def keep_mask(
    shape: torch.Size | tuple[int, ...], drop_rate: float, seed: int, task: str, name: str
) -> torch.Tensor:
    """Bernoulli keep-mask ``m ~ Bernoulli(1 − p)`` for one (task, tensor).

    Drawn from a NumPy ``SFC64`` bit generator seeded with
    :func:`~mergeflow.methods.registry.tensor_seed` ``(seed, task, name)``, so the mask does
    not depend on dict order or on which other tensors exist. Each entry takes 32 random bits
    ``u`` (uniform on the int32 range) and is kept iff ``u ≥ −2³¹ + round(p·2³²)``, i.e. with
    probability ``1 − p`` up to ``2⁻³³``. Raw bits are about 4× cheaper than ``torch.rand``
    floats, and the generator releases the GIL, so engine workers draw masks in parallel.
    Yu et al., "Language Models are Super Mario" (ICML 2024).

    Args:
        shape: Tensor shape.
        drop_rate: ``p`` in ``[0, 1)``.
        seed: User seed.
        task: Task name.
        name: Tensor key.

    Returns:
        Bool CPU tensor of ``shape``; ``True`` = keep.

    """
    n = math.prod(shape)
    threshold = round(drop_rate * 2**32) - 2**31
    if threshold > 2**31 - 1:  # p within 2⁻³³ of 1: nothing is kept
        return torch.zeros(tuple(shape), dtype=torch.bool)
    bits = np.random.SFC64(tensor_seed(seed, task, name)).random_raw((n + 1) // 2)
    u = torch.from_numpy(bits.view(np.int32)[:n])
    return (u >= threshold).reshape(tuple(shape))


def drop_and_rescale(
    tau: torch.Tensor,
    keep: torch.Tensor,
    drop_rate: float,
    rescale: Literal["inverse", "l1"] = "inverse",
) -> torch.Tensor:
    """Apply a DARE keep-mask and rescale.

    ``inverse``: ``τ̃ = (m ⊙ τ) / (1 − p)`` (Yu et al., "Language Models are Super Mario",
    ICML 2024), so ``E[τ̃] = τ``. ``l1``: ``τ̃ = (m ⊙ τ) · ‖τ‖₁ / ‖m ⊙ τ‖₁`` (the tensor's L1
    norm is preserved; left unscaled if either norm is 0).

    Args:
        tau: Task vector of one tensor (float32).
        keep: Bool mask of the same shape (``True`` = keep).
        drop_rate: ``p`` in ``[0, 1)``.
        rescale: ``"inverse"`` or ``"l1"``.

    Returns:
        New float32 tensor ``τ̃``.

    """
    keep = keep.to(device=tau.device)
    if rescale == "inverse":
        kept = tau * keep
        return kept.div_(1.0 - drop_rate) if drop_rate else kept
    org = torch.linalg.vector_norm(tau, 1)
    kept = tau * keep
    new = torch.linalg.vector_norm(kept, 1)
    if float(org) > 0 and float(new) > 0:
        kept.mul_(org / new)
    return kept


@register("dare", DareParams, paper=PAPER)
def dare(base: StateDict, experts: Mapping[str, StateDict], params: DareParams) -> StateDict:
    """DARE: randomly drop task-vector entries, rescale, then combine.

    For every task ``t`` and tensor: ``m_t ~ Bernoulli(1 − p)``,
    ``τ̃_t = m_t ⊙ τ_t / (1 − p)`` (or L1-preserving rescale). Then
    ``θ = θ_0 + λ Σ_t τ̃_t`` (``combine="task_arithmetic"``) or
    ``θ = θ_0 + λ · TIES-disjoint-mean(τ̃)`` with sign election ``γ = sgn(Σ_t τ̃_t)`` and no
    magnitude trim (``combine="ties"``, i.e. TIES density 1). Yu et al., "Language Models are
    Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch" (ICML 2024).
    Deterministic given ``seed`` (per-(task, tensor) generators, see :func:`keep_mask`).

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict (already validated).
        params: ``drop_rate``, ``rescale``, ``combine``, ``scaling``, ``seed``.

    Returns:
        Merged state dict in ``base``'s dtypes.

    """
    tasks = list(experts)

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for name in mergeable_keys(base):
            tau = stacked_deltas(base, experts, name)
            for i, task in enumerate(tasks):
                if params.drop_rate == 0:
                    continue  # m = 1 everywhere and both rescales are the identity
                m = keep_mask(tau.shape[1:], params.drop_rate, params.seed, task, name)
                tau[i] = drop_and_rescale(tau[i], m, params.drop_rate, params.rescale)
            if params.combine == "ties":
                yield name, resolve_and_merge(tau)
            else:
                yield name, tau.sum(dim=0)

    return assemble(base, deltas(), params.scaling)
