"""PCB merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.registry import (
    MethodParams,
    assemble,
    mergeable_keys,
    register,
    stacked_deltas,
)
from mergeflow.tensors import StateDict

PAPER = (
    "Du, Lee, Li, Jiang, Guo, Liu, Wu, Zhou, Zhang. Parameter Competition Balancing for Model "
    "Merging. NeurIPS 2024. arXiv:2410.02396"
)

_F32 = torch.float32


class PcbParams(MethodParams):
    """Hyper-parameters of PCB merging."""

    ratio: float = Field(
        0.1, gt=0, le=1, description="fraction r of entries kept per task after balancing"
    )
    clip: float = Field(
        1e-4, ge=0, lt=0.5, description="outlier clip: |τ| clamped to its [clip, 1-clip] quantiles"
    )
    scaling: float = Field(0.3, ge=0, description="λ applied to the merged task vector")
    scope: Literal["tensor", "global"] = Field(
        "global",
        description="'global': statistics over each task's whole flattened task vector "
        "(paper); 'tensor': per tensor",
    )


@dataclass(frozen=True)
class PcbStats:
    """Per-task statistics PCB normalises by (each a float32 tensor of shape ``(T,)``).

    Attributes:
        lo: ``|τ_t|`` value at rank ``⌊n·clip⌋`` (lower clip).
        hi: ``|τ_t|`` value at rank ``⌊n·(1−clip)⌋−1`` (upper clip).
        thr: ``β_t`` value at rank ``⌊n·(1−ratio)⌋`` (the drop threshold).
        top: ``max β_t``.

    """

    lo: torch.Tensor
    hi: torch.Tensor
    thr: torch.Tensor
    top: torch.Tensor


def _rank_value(x: torch.Tensor, idx: int) -> torch.Tensor:
    """Value at 0-based position ``idx`` of each row of ``x`` sorted ascending (no sort)."""
    n = x.shape[-1]
    idx = min(max(idx, 0), n - 1)
    return torch.kthvalue(x, idx + 1, dim=-1).values


def clip_ranks(n: int, clip: float) -> tuple[int, int]:
    """0-based ranks of the lower/upper clip values, as in the authors' code."""
    return int(n * clip), int(n * (1 - clip)) - 1


def drop_rank(n: int, ratio: float) -> int:
    """0-based rank of the drop threshold: entries at or below it get weight 0."""
    return int(n * (1 - ratio))


def _norm(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = (hi - lo).reshape(-1, *([1] * (x.dim() - 1)))
    lo = lo.reshape(span.shape)
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-30), torch.zeros_like(x))


def balance(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Balancing matrix ``β_t = exp(T·norm(|τ̄_t|)²) ⊙ tanh(τ_t ⊙ Σ_j τ_j)``.

    ``τ̄_t`` is ``τ_t`` with magnitudes clamped to ``[lo_t, hi_t]``; ``norm`` maps
    ``[lo_t, hi_t]`` to ``[0, 1]``. Intra-balancing ``exp(T·norm(τ̄_t ⊙ τ̄_t))`` (the paper's
    softmax up to a per-task constant, which the later min-max normalisation cancels) times
    inter-balancing ``tanh(τ_t ⊙ Σ_j τ_j)``. Du et al., NeurIPS 2024, Eq. 2–4.

    Args:
        tau: ``(T, *shape)`` float32 task vectors of one tensor (or flattened, ``(T, n)``).
        lo: ``(T,)`` lower clip values.
        hi: ``(T,)`` upper clip values.

    Returns:
        ``β`` of ``tau``'s shape.

    """
    t = tau.shape[0]
    shp = (-1, *([1] * (tau.dim() - 1)))
    mag = torch.minimum(torch.maximum(tau.abs(), lo.reshape(shp)), hi.reshape(shp))
    intra = torch.exp(t * _norm(mag, lo, hi) ** 2)
    inter = torch.tanh(tau * tau.sum(dim=0, keepdim=True))
    return intra * inter


def merge_tensor(tau: torch.Tensor, stats: PcbStats) -> torch.Tensor:
    """PCB drop, rescale and weighted merge of one tensor given per-task statistics.

    ``w_t = norm(clamp(β_t, thr_t, top_t))`` (so the ``1 − ratio`` lowest-``β`` entries get
    weight 0), ``τ_m = Σ_t w_t ⊙ τ̄_t / Σ_t w_t`` with ``τ̄_t = sgn(τ_t)·clamp(|τ_t|, lo_t,
    hi_t)`` (0 where ``Σ_t w_t = 0``). Du et al., NeurIPS 2024, Eq. 5–6.

    Args:
        tau: ``(T, *shape)`` float32 task vectors.
        stats: Per-task statistics, see :class:`PcbStats`.

    Returns:
        Merged task vector of shape ``shape``.

    """
    shp = (-1, *([1] * (tau.dim() - 1)))
    beta = balance(tau, stats.lo, stats.hi)
    beta = torch.minimum(torch.maximum(beta, stats.thr.reshape(shp)), stats.top.reshape(shp))
    w = _norm(beta, stats.thr, stats.top)
    clipped = torch.sign(tau) * torch.minimum(
        torch.maximum(tau.abs(), stats.lo.reshape(shp)), stats.hi.reshape(shp)
    )
    return (w * clipped).sum(dim=0) / w.sum(dim=0).clamp_min(1e-12)


def stats_of(flat: torch.Tensor, params: PcbParams) -> PcbStats:
    """Per-task statistics of ``flat`` (``(T, n)`` float32 task vectors), by ``kthvalue``.

    Args:
        flat: Task vectors, one row per task.
        params: ``ratio`` and ``clip``.

    Returns:
        :class:`PcbStats`.

    """
    n = flat.shape[1]
    mag = flat.abs()
    i_lo, i_hi = clip_ranks(n, params.clip)
    lo, hi = _rank_value(mag, i_lo), _rank_value(mag, i_hi)
    del mag
    beta = balance(flat, lo, hi)
    thr = _rank_value(beta, drop_rank(n, params.ratio))
    return PcbStats(lo=lo, hi=hi, thr=thr, top=beta.max(dim=1).values)


def _flat_deltas(
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    keys: Sequence[str],
) -> torch.Tensor:
    return torch.cat(
        [stacked_deltas(base, experts, k).reshape(len(experts), -1) for k in keys], dim=1
    )


@register("pcb", PcbParams, paper=PAPER)
def pcb(base: StateDict, experts: Mapping[str, StateDict], params: PcbParams) -> StateDict:
    """PCB merging: balance parameter competition within and across tasks, drop, rescale.

    With ``τ_t = θ_t − θ_0`` and ``T`` tasks, per task over the flattened task vector
    (``scope="global"``, as the authors' code) or per tensor:

    1. Intra-balancing ``β_intra,t = exp(T · norm(τ̄_t ⊙ τ̄_t))`` (``τ̄_t``: magnitudes clipped to
       their ``clip``/``1−clip`` quantiles; ``norm``: min-max to ``[0, 1]``).
    2. Inter-balancing ``β_inter,t = tanh(τ_t ⊙ Σ_j τ_j)``; ``β_t = β_intra,t ⊙ β_inter,t``.
    3. Drop: ``β_t`` below its ``(1 − ratio)`` quantile is set to that quantile, then min-max
       normalised: ``w_t = norm(clamp(β_t, q_{1−r}, max β_t))`` (dropped entries get 0).
    4. Rescale and merge: ``τ_m = Σ_t w_t ⊙ τ̄_t / Σ_t w_t``; ``θ = θ_0 + λ τ_m``.

    Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024). Quantiles use
    ``torch.kthvalue`` (no sort).

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict (already validated).
        params: ``ratio``, ``clip``, ``scaling`` (λ), ``scope``.

    Returns:
        Merged state dict in ``base``'s dtypes.

    """
    keys = mergeable_keys(base)
    stats = None
    if params.scope == "global" and keys:
        stats = stats_of(_flat_deltas(base, experts, keys), params)

    def deltas():
        for name in keys:
            tau = stacked_deltas(base, experts, name)
            st = stats if stats is not None else stats_of(tau.reshape(tau.shape[0], -1), params)
            yield name, merge_tensor(tau, st)

    return assemble(base, deltas(), params.scaling)
