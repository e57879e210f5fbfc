"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods import chunks
from mergeflow.methods.chunks import (
    BaseF32,
    Source,
    TensorInputs,
    kth_smallest,
    model_chunks,
    ranges,
    task_slice,
    total_numel,
)
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.methods.select import select_ranks
from mergeflow.tensors import num_keep

PAPER = (
    "Yadav, Tam, Choshen, Raffel, Bansal. TIES-Merging: Resolving Interference When Merging "
    "Models. NeurIPS 2023. arXiv:2306.01708"
)

_F32 = torch.float32


class TiesParams(MethodParams):
    """Hyper-parameters of TIES-Merging."""

    density: float = Field(0.2, gt=0, le=1, description="fraction k of |τ| kept by the trim")
    scaling: float = Field(1.0, ge=0, description="λ applied to the merged task vector")
    scope: Literal["tensor", "global"] = Field(
        "global",
        description="'global': one top-k threshold per task over its whole flattened task "
        "vector (paper); 'tensor': a threshold per tensor",
    )


def trim_rank(n: int, density: float) -> int | None:
    """0-based ascending rank of the trim threshold among ``n`` magnitudes, or ``None``.

    ``thr = |τ|_(n−k)`` (the k-th largest) with ``k = num_keep(n, density)``, so ``|τ| ≥ thr``
    keeps the top-``density`` fraction (plus exact ties). ``None`` when nothing is trimmed
    (``density ≥ 1``, ``k = n`` or ``n = 0``). Yadav et al., NeurIPS 2023.
    """
    k = num_keep(n, density)
    return None if n == 0 or density >= 1.0 or k >= n else n - k


def global_thresholds(params: TiesParams, source: Source) -> list[float] | None:
    """Per-task trim thresholds over each task's whole flattened task vector (``scope="global"``).

    ``thr_t = |vec(τ_t)|_(n−k)`` over the ``n`` mergeable parameters of the model, by exact
    streamed selection (:func:`~mergeflow.methods.select.select_ranks`: two passes, no copy of
    the model), as in Yadav et al., "TIES-Merging" (NeurIPS 2023). ``None`` for
    ``scope="tensor"`` (the kernel then thresholds each tensor on its own).

    Returns:
        One threshold per task (``0.0`` = no trim), or ``None``.

    """
    if params.scope != "global":
        return None
    rank = trim_rank(total_numel(source), params.density)
    if rank is None:
        return [0.0] * len(source.tasks)
    vals = select_ranks(model_chunks(source, torch.abs), len(source.tasks), [rank])
    return [float(v) for v in vals[:, 0]]


def tensor_threshold(e: torch.Tensor, bf: BaseF32, density: float) -> float:
    """Per-tensor trim threshold ``thr = |τ|_(n−k)`` of one expert's tensor (see :func:`trim_rank`).

    Found by :func:`~mergeflow.methods.chunks.kth_smallest` on one float32 scratch copy of
    ``|τ|`` (O(n), no sort).
    """
    n = bf.numel()
    rank = trim_rank(n, density)
    if rank is None:
        return 0.0
    e = e.reshape(-1)
    mags = torch.empty(n, dtype=_F32, device=bf.device)
    for s in ranges(n):
        mags[s].copy_(e[s]).sub_(bf[s]).abs_()
    return kth_smallest(mags, rank + 1)


def _trim(r: torch.Tensor, thr: float, scratch: torch.Tensor) -> None:
    """``r ← r ⊙ 1[|r| ≥ thr]`` in place.

    The indicator is formed in float32 (``|r|`` then an in-place ``≥``) and multiplied in:
    ~14× faster on CPU than ``masked_fill_`` with a bool mask. Trimmed negatives become
    ``−0.0``, which no later step tells apart from ``0.0``.
    """
    r.mul_(torch.abs(r, out=scratch[: r.numel()]).ge_(thr))


def disjoint_merge(
    inp: TensorInputs,
    row: Callable[[int, torch.Tensor, slice], tuple[torch.Tensor, float]],
) -> torch.Tensor:
    """TIES trim, elect and disjoint mean of one tensor, in one pass over the experts.

    ``row(i, e_i, s)`` gives expert ``i``'s chunk ``τ_i[s]`` (a scratch tensor, modified in
    place here) and its trim threshold ``thr`` (``τ̂ = τ ⊙ 1[|τ| ≥ thr]``; no trim when
    ``thr = 0``). Accumulates ``S = Σ_t τ̂_t``, ``P = Σ_t max(τ̂_t, 0)`` and the counts of
    positive / negative entries; ``N = S − P = Σ_t min(τ̂_t, 0)``. Then ``γ = sgn(S)`` (sign of
    the total mass) and the mean over the agreeing tasks is ``P / #pos`` where ``γ > 0``,
    ``N / #neg`` where ``γ < 0``, 0 where ``γ = 0``: the elect + disjoint merge of Yadav et al.,
    "TIES-Merging" (NeurIPS 2023), ``τ_m = Σ_{t∈A} τ̂_t / |A|``, ``A = {t : sgn(τ̂_t) = γ}``,
    without a second pass. Peak: two float32 and two uint8 copies of the tensor.

    Returns:
        Flat float32 ``τ_m``.

    """
    n = inp.base.numel()
    dev = inp.base.device
    cdt = torch.uint8 if len(inp.tasks) < 256 else torch.int32
    tot = torch.zeros(n, dtype=_F32, device=dev)
    pos = torch.zeros(n, dtype=_F32, device=dev)
    n_pos = torch.zeros(n, dtype=cdt, device=dev)
    n_neg = torch.zeros(n, dtype=cdt, device=dev)
    m = min(n, chunks.CHUNK)
    scratch = torch.empty(m, dtype=_F32, device=dev)
    flag = torch.empty(m, dtype=cdt, device=dev)  # comparisons written straight into the counts
    for i in range(len(inp.tasks)):
        e = inp.expert(i).reshape(-1)
        for s in ranges(n):
            r, thr = row(i, e, s)  # a scratch chunk: trimmed and clamped in place below
            f = flag[: r.numel()]
            if thr > 0:
                _trim(r, thr, scratch)
            tot[s].add_(r)
            n_pos[s].add_(torch.gt(r, 0.0, out=f))
            n_neg[s].add_(torch.lt(r, 0.0, out=f))
            pos[s].add_(r.clamp_min_(0.0))
    up, zero = tot > 0, tot == 0
    neg = tot.sub_(pos)  # N = Σ τ̂ − P, in place: the peak stays at two float32 copies
    pos.div_(n_pos.clamp_min_(1))
    neg.div_(n_neg.clamp_min_(1))
    del n_pos, n_neg
    torch.where(up, pos, neg, out=neg)
    return neg.masked_fill_(zero, 0.0)


@register("ties", TiesParams, paper=PAPER, prepare=global_thresholds)
def ties(inp: TensorInputs, params: TiesParams, thresholds: list[float] | None) -> torch.Tensor:
    """TIES-Merging of one tensor: trim, elect sign, disjoint merge.

    1. Trim: ``τ̂_t = τ_t ⊙ 1[|τ_t| ≥ thr_t]`` keeping the top ``density`` fraction by
       magnitude (per task over the whole model for ``scope="global"``, see
       :func:`global_thresholds`; per tensor for ``scope="tensor"``, see
       :func:`tensor_threshold`).
    2. Elect: ``γ = sgn(Σ_t τ̂_t)`` (sign of the total mass).
    3. Disjoint merge: ``τ_m = Σ_{t∈A} τ̂_t / |A|``, ``A = {t : sgn(τ̂_t) = γ}``
       (:func:`disjoint_merge`); the merged model is ``θ = θ_0 + λ τ_m``.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).

    Args:
        inp: The tensor's base value and expert readers.
        params: ``density``, ``scaling`` (λ, applied by the caller), ``scope``.
        thresholds: Per-task global thresholds, or ``None`` for per-tensor ones.

    Returns:
        Flat float32 ``τ_m``.

    """
    bf = BaseF32(inp.base)
    thr: dict[int, float] = {}

    def row(i: int, e: torch.Tensor, s: slice) -> tuple[torch.Tensor, float]:
        if i not in thr:
            thr[i] = (
                thresholds[i] if thresholds is not None else tensor_threshold(e, bf, params.density)
            )
        return task_slice(e, bf, s), thr[i]

    return disjoint_merge(inp, row)
