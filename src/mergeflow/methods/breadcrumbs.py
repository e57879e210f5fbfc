"""Model Breadcrumbs (Davari & Belilovsky, 2023)."""

from __future__ import annotations

import torch
from pydantic import Field, ValidationInfo, field_validator

from mergeflow.methods.chunks import TensorInputs, stacked
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register

PAPER = (
    "Davari, Belilovsky. Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse "
    "Masks. arXiv:2312.06795 (2023); ECCV 2024"
)

_F32 = torch.float32


class BreadcrumbsParams(MethodParams):
    """Hyper-parameters of Model Breadcrumbs (paper notation: β lower, γ upper percentile)."""

    beta: float = Field(
        0.85, ge=0, lt=1, description="fraction of smallest-magnitude entries dropped per tensor"
    )
    gamma: float = Field(
        0.993,
        gt=0,
        le=1,
        description="upper percentile: entries ranked above gamma (the top 1-gamma fraction, "
        "outliers) are dropped; must exceed beta. Kept density = gamma - beta",
        validate_default=True,
    )
    scaling: float = Field(0.3, ge=0, description="α applied to the summed masked task vectors")

    @field_validator("gamma")
    @classmethod
    def _gamma_above_beta(cls, gamma: float, info: ValidationInfo) -> float:
        beta = info.data.get("beta")
        if beta is not None and gamma <= beta:
            raise ValueError(f"gamma must be greater than beta ({beta})")
        return gamma


def breadcrumbs_mask(t: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask of one tensor: keep magnitudes between the β and γ percentiles.

    With the entries ranked by ``|t|`` ascending (ranks ``0..n−1``), keep ranks in
    ``[⌊β·n⌋, ⌊γ·n⌋)``: the bottom ``β`` fraction (small perturbations) and the top
    ``1 − γ`` fraction (outliers) are masked out. Implemented with two ``torch.kthvalue``
    thresholds, ``lo = kth(⌊β·n⌋ + 1)``, ``hi = kth(⌊γ·n⌋ + 1)``, mask ``lo ≤ |t| < hi``;
    magnitudes tied at a threshold share its fate. Davari & Belilovsky, "Model Breadcrumbs:
    Scaling Multi-Task Model Merging with Sparse Masks" (2023).

    Args:
        t: Task vector of one tensor.
        beta: Lower fraction in ``[0, 1)``.
        gamma: Upper percentile in ``(beta, 1]``.

    Returns:
        Bool tensor shaped like ``t``.

    """
    n = t.numel()
    if n == 0:
        return torch.zeros_like(t, dtype=torch.bool)
    mags = t.reshape(-1).to(_F32).abs()
    lo_rank = int(beta * n + 1e-6)
    hi_rank = int(gamma * n + 1e-6)
    mask = torch.ones(n, dtype=torch.bool, device=t.device)
    if lo_rank >= hi_rank:
        return mask.zero_().view(t.shape)
    if lo_rank > 0:
        mask &= mags >= torch.kthvalue(mags, lo_rank + 1).values
    if hi_rank < n:
        mask &= mags < torch.kthvalue(mags, hi_rank + 1).values
    return mask.view(t.shape)


@register("breadcrumbs", BreadcrumbsParams, paper=PAPER)
def breadcrumbs(inp: TensorInputs, params: BreadcrumbsParams, ctx: None = None) -> torch.Tensor:
    """Model Breadcrumbs of one tensor: mask small and outlier deltas, then sum.

    ``τ̂_t = τ_t ⊙ 1[lo_t ≤ |τ_t| < hi_t]`` per tensor, where ``lo_t``/``hi_t`` are the β and γ
    magnitude percentiles (see :func:`breadcrumbs_mask`); ``τ_merged = Σ_t τ̂_t`` and
    ``θ = θ_0 + α τ_merged``. Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks" (2023). Defaults β = 0.85, γ = 0.993 are the paper's (kept
    density 14.3%). The percentiles need each task's whole tensor (:func:`~.chunks.stacked`).

    Args:
        inp: The tensor's base value and expert readers.
        params: ``beta``, ``gamma``, ``scaling`` (α, applied by the caller).
        ctx: Unused.

    Returns:
        ``τ_merged`` (the base tensor's shape), float32.

    """
    tau = stacked(inp)
    for i in range(tau.shape[0]):
        tau[i].masked_fill_(~breadcrumbs_mask(tau[i], params.beta, params.gamma), 0.0)
    return tau.sum(dim=0)
