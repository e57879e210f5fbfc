"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models")."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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
from mergeflow.tensors import (
    StateDict,
    disjoint_mean,
    elect_sign,
    magnitude_threshold,
    num_keep,
)

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


def global_threshold(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    density: float,
) -> float:
    """Top-k magnitude threshold over one task's whole flattened task vector.

    ``thr_t = kthvalue(|vec(τ_t)|, n − k + 1)`` with ``k = ⌈density·n⌉`` and ``n`` the number
    of mergeable parameters, so ``|τ_t| ≥ thr_t`` keeps the top-``density`` fraction of the
    *whole* model, as in Yadav et al., "TIES-Merging" (NeurIPS 2023). Memory: one float32
    buffer of ``n`` entries for this task (plus ``torch.kthvalue``'s working copy); tasks are
    processed one at a time, no sort is performed.

    Args:
        base: Pre-trained state dict ``θ_0``.
        finetuned: One expert's state dict ``θ_t``.
        keys: Mergeable keys to include.
        density: Fraction kept, in ``(0, 1]``.

    Returns:
        The threshold (``0.0`` when ``density >= 1`` or there are no parameters).

    """
    n = sum(base[k].numel() for k in keys)
    if n == 0 or density >= 1.0 or num_keep(n, density) >= n:
        return 0.0
    device = base[keys[0]].device
    buf = torch.empty(n, dtype=_F32, device=device)
    off = 0
    for k in keys:
        b = base[k]
        m = b.numel()
        view = buf[off : off + m]
        torch.sub(
            finetuned[k].to(device=device, dtype=_F32).reshape(-1),
            b.to(device=device, dtype=_F32).reshape(-1),
            out=view,
        )
        view.abs_()
        off += m
    return magnitude_threshold(buf, density)


def resolve_and_merge(stacked: torch.Tensor) -> torch.Tensor:
    """TIES elect + disjoint merge of already-trimmed task vectors of one tensor.

    ``γ = sgn(Σ_t τ̂_t)``; ``τ_m = mean_{t: sgn(τ̂_t)=γ} τ̂_t`` (0 where no task agrees).
    Yadav et al., "TIES-Merging" (NeurIPS 2023).

    Args:
        stacked: ``(T, *shape)`` trimmed task vectors, float32.

    Returns:
        ``τ_m`` of shape ``shape``.

    """
    return disjoint_mean(stacked, elect_sign(stacked))


@register("ties", TiesParams, paper=PAPER)
def ties(base: StateDict, experts: Mapping[str, StateDict], params: TiesParams) -> StateDict:
    """TIES-Merging: trim, elect sign, disjoint merge, ``θ = θ_0 + λ τ_m``.

    1. Trim: ``τ̂_t = τ_t ⊙ 1[|τ_t| ≥ thr_t]`` keeping the top ``density`` fraction by
       magnitude (per task over the whole model for ``scope="global"``, per tensor for
       ``scope="tensor"``; thresholds via ``torch.kthvalue``).
    2. Elect: ``γ = sgn(Σ_t τ̂_t)`` (sign of the total mass).
    3. Disjoint merge: ``τ_m = Σ_{t∈A} τ̂_t / |A|``, ``A = {t : sgn(τ̂_t) = γ}``.

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
    Global scope needs one extra pass per task over the model to find ``thr_t`` (see
    :func:`global_threshold`); the merge itself runs one tensor at a time.

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict (already validated).
        params: ``density``, ``scaling`` (λ), ``scope``.

    Returns:
        Merged state dict in ``base``'s dtypes.

    """
    keys = mergeable_keys(base)
    tasks = list(experts)
    thresholds: list[float] | None = None
    if params.scope == "global":
        thresholds = [global_threshold(base, experts[t], keys, params.density) for t in tasks]

    def deltas() -> Iterator[tuple[str, torch.Tensor]]:
        for name in keys:
            tau = stacked_deltas(base, experts, name)
            for i in range(len(tasks)):
                row = tau[i]
                if thresholds is None:
                    thr = magnitude_threshold(row, params.density)
                else:
                    thr = thresholds[i]
                if thr > 0:
                    row.masked_fill_(row.abs() < thr, 0.0)
            yield name, resolve_and_merge(tau)

    return assemble(base, deltas(), params.scaling)
