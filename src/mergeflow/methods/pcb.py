"""PCB merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.chunks import (
    Source,
    TensorInputs,
    column_chunks,
    model_chunks,
    total_numel,
)
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.methods.select import select_ranks

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


def statistics(
    chunks: Callable[
        [Callable[[torch.Tensor], torch.Tensor]], Callable[[], Iterator[torch.Tensor]]
    ],
    n_tasks: int,
    n: int,
    params: PcbParams,
) -> PcbStats:
    """Per-task statistics of a ``(T, n)`` matrix of task vectors seen in column chunks.

    ``lo``/``hi``: ``|τ_t|`` at ranks :func:`clip_ranks`; ``thr``: ``β_t`` (:func:`balance` with
    those clips) at rank :func:`drop_rank`; ``top = max β_t``. Exact order statistics by
    :func:`~mergeflow.methods.select.select_ranks` (``torch.kthvalue``'s values, no sort): over
    the whole model for ``scope="global"`` (streamed, four passes) or one tensor. Du et al.,
    NeurIPS 2024.

    Args:
        chunks: ``chunks(fn)`` returns a re-callable stream of ``fn((T, m) τ chunk)``.
        n_tasks: ``T``.
        n: Number of columns (parameters).
        params: ``ratio`` and ``clip``.

    Returns:
        :class:`PcbStats`.

    """
    i_lo, i_hi = (min(max(i, 0), n - 1) for i in clip_ranks(n, params.clip))
    q = select_ranks(chunks(torch.abs), n_tasks, [i_lo, i_hi])
    lo, hi = q[:, 0].contiguous(), q[:, 1].contiguous()
    top = torch.full((n_tasks,), float("-inf"))

    def beta(tau: torch.Tensor) -> torch.Tensor:
        bt = balance(tau, lo, hi)
        torch.maximum(top, bt.amax(dim=1), out=top)
        return bt

    i_thr = min(max(drop_rank(n, params.ratio), 0), n - 1)
    thr = select_ranks(chunks(beta), n_tasks, [i_thr])[:, 0].contiguous()
    return PcbStats(lo=lo, hi=hi, thr=thr, top=top)


def global_statistics(params: PcbParams, source: Source) -> PcbStats | None:
    """:func:`statistics` over every task's whole flattened task vector (``scope="global"``).

    Returns:
        The statistics, or ``None`` for ``scope="tensor"`` (the kernel then computes them per
        tensor) or a model without parameters.

    """
    n = total_numel(source)
    if params.scope != "global" or n == 0:
        return None
    return statistics(lambda fn: model_chunks(source, fn), len(source.tasks), n, params)


@register("pcb", PcbParams, paper=PAPER, prepare=global_statistics)
def pcb(inp: TensorInputs, params: PcbParams, stats: PcbStats | None) -> torch.Tensor:
    """PCB merging of one tensor: balance parameter competition within and across tasks.

    With ``τ_t = θ_t − θ_0`` and ``T`` tasks, per task over the flattened task vector
    (``scope="global"``, as the authors' code; statistics from :func:`global_statistics`) or
    per tensor (computed here by :func:`statistics`):

    1. Intra-balancing ``β_intra,t = exp(T · norm(τ̄_t ⊙ τ̄_t))`` (``τ̄_t``: magnitudes clipped to
       their ``clip``/``1−clip`` quantiles; ``norm``: min-max to ``[0, 1]``).
    2. Inter-balancing ``β_inter,t = tanh(τ_t ⊙ Σ_j τ_j)``; ``β_t = β_intra,t ⊙ β_inter,t``.
    3. Drop: ``β_t`` below its ``(1 − ratio)`` quantile is set to that quantile, then min-max
       normalised: ``w_t = norm(clamp(β_t, q_{1−r}, max β_t))`` (dropped entries get 0).
    4. Rescale and merge: ``τ_m = Σ_t w_t ⊙ τ̄_t / Σ_t w_t``; ``θ = θ_0 + λ τ_m``.

    Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024). Steps 1–4 are
    element-wise given the statistics, so they run on ``(T, CHUNK)`` column chunks
    (:func:`merge_tensor`).

    Args:
        inp: The tensor's base value and expert readers.
        params: ``ratio``, ``clip``, ``scaling`` (λ, applied by the caller), ``scope``.
        stats: Whole-model statistics, or ``None`` for per-tensor ones.

    Returns:
        Flat float32 ``τ_m``.

    """
    n = inp.base.numel()
    out = torch.zeros(n, dtype=_F32, device=inp.base.device)
    if n == 0:
        return out
    if stats is None:
        stats = statistics(
            lambda fn: lambda: (fn(tau) for _, tau in column_chunks(inp)), len(inp.tasks), n, params
        )
    for s, tau in column_chunks(inp):
        out[s] = merge_tensor(tau, stats)
    return out
