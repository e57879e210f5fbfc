"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference…", CVPR 2025)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergeflow.methods.chunks import TensorInputs, stacked
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register

PAPER = (
    "Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà. Task Singular Vectors: "
    "Reducing Task Interference in Model Merging. CVPR 2025. arXiv:2412.00081"
)


class TsvParams(MethodParams):
    """Hyper-parameters of TSV-Merge."""

    scaling: float = Field(1.0, ge=0, description="α applied to the merged task vector (paper: 1)")
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fraction of each task's singular components kept per matrix; "
        "default 1/T (paper)",
    )


def merge_matrix(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """TSV-M for one weight matrix: low-rank per task, then decorrelate by orthogonalisation.

    For each task ``Δ_t = U_t Σ_t V_tᵀ`` (thin SVD), keep its top ``k = max(1, ⌊fraction ·
    min(m, n)⌋)`` components; concatenate ``U = [U_1,k … U_T,k]``, ``Σ = diag(Σ_1,k … Σ_T,k)``,
    ``V = [V_1,k … V_T,k]``; replace ``U`` and ``V`` by their nearest orthogonal matrices
    (``U_⊥ = P Qᵀ`` for ``U = P S Qᵀ``, likewise ``V_⊥``); ``Δ = U_⊥ Σ V_⊥ᵀ``. Gargiulo et al.,
    CVPR 2025, Sec. 4 (Eq. 5–7). (The paper's ``⌊·⌋`` alone gives ``k = 0`` when
    ``T > min(m, n)``; at least one component per task is kept instead.)

    Args:
        tau: ``(T, m, n)`` float32 task vectors of one matrix.
        fraction: Fraction of singular components kept per task.

    Returns:
        ``(m, n)`` merged task vector.

    """
    t, m, n = tau.shape
    k = max(1, int(min(m, n) * fraction + 1e-9))
    us, ss, vs = [], [], []
    for i in range(t):
        u, s, vh = torch.linalg.svd(tau[i], full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :])
    u_cat = torch.cat(us, dim=1)
    s_cat = torch.cat(ss)
    vh_cat = torch.cat(vs, dim=0)
    pu, _, qu = torch.linalg.svd(u_cat, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh_cat, full_matrices=False)
    return (pu @ qu) @ torch.diag(s_cat) @ (pv @ qv)


@register("tsv", TsvParams, paper=PAPER)
def tsv(inp: TensorInputs, params: TsvParams, ctx: None = None) -> torch.Tensor:
    """TSV-Merge of one tensor: merge task singular vectors after decorrelating them.

    2-D tensors: :func:`merge_matrix` (``Δ = U_⊥ Σ V_⊥ᵀ``) with ``fraction`` (default ``1/T``,
    the paper's). Other tensors (biases, norms, scalars): the mean ``Σ_t τ_t / T``, as the
    authors' code. ``θ = θ_0 + α Δ`` with ``α = 1`` (paper). Gargiulo et al., "Task Singular
    Vectors: Reducing Task Interference in Model Merging" (CVPR 2025). A matrix needs its ``T``
    whole task vectors (an SVD each), so the kernel holds them (:func:`~.chunks.stacked`).

    Args:
        inp: The tensor's base value and expert readers.
        params: ``scaling`` (α, applied by the caller), ``fraction``.
        ctx: Unused.

    Returns:
        ``Δ`` (the base tensor's shape), float32.

    """
    tau = stacked(inp)
    if tau.dim() == 3 and min(tau.shape[1:]) > 0:
        frac = params.fraction if params.fraction is not None else 1.0 / len(inp.tasks)
        return merge_matrix(tau, frac)
    return tau.mean(dim=0)
