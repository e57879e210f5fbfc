"""TALL masks and consensus masks.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024 (arXiv:2405.07813).

* TALL mask of task ``t``: ``m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|]`` with ``τ_MTL = Σ_s τ_s``.
* Consensus mask: ``m_cons = 1[Σ_t m_t ≥ k]``.

Note: FusionBench's ``generate_task_masks`` is called with task vectors where fine-tuned
weights are expected; this module implements the paper's formula on task vectors directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergeflow.tensors import (
    MergeError,
    StateDict,
    check_compatible,
    is_mergeable,
    per_task,
)

__all__ = ["tall_masks", "tall_masks_from_vectors", "tall_mask_stack", "consensus_mask"]

_F32 = torch.float32


def tall_mask_stack(
    stacked: torch.Tensor, lambdas: torch.Tensor, mtl: torch.Tensor | None = None
) -> torch.Tensor:
    """TALL masks of one tensor for all tasks at once.

    ``m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|]``, ``τ_MTL = Σ_t τ_t`` unless given. Wang et al.,
    "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024).

    Args:
        stacked: ``(T, *shape)`` float32 task vectors of one tensor.
        lambdas: ``(T,)`` float32 ``λ_t``.
        mtl: Optional ``shape`` multi-task vector; default ``stacked.sum(0)``.

    Returns:
        ``(T, *shape)`` bool tensor.

    """
    if mtl is None:
        mtl = stacked.sum(dim=0)
    mtl = mtl.to(device=stacked.device, dtype=stacked.dtype)
    out = torch.empty(stacked.shape, dtype=torch.bool, device=stacked.device)
    # One task at a time: temporaries stay at one copy of the tensor.
    for i, lam in enumerate(lambdas.tolist()):
        diff = torch.sub(mtl, stacked[i]).abs_().mul_(lam)
        torch.ge(stacked[i].abs(), diff, out=out[i])
    return out


def _lambda_tensor(lambdas: float | Mapping[str, float], tasks: list[str]) -> torch.Tensor:
    lam = per_task(lambdas, tasks, "tall_lambda", 0.0)
    for t, v in lam.items():
        if v < 0:
            raise MergeError(f"hyperparameter 'tall_lambda' for task '{t}' must be >= 0, got {v}")
    return torch.tensor([lam[t] for t in tasks], dtype=_F32)


def tall_masks(
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    lambdas: float | Mapping[str, float],
) -> dict[str, dict[str, torch.Tensor]]:
    """TALL masks of every task, computed from fine-tuned checkpoints.

    ``τ_t = θ_t − θ_0``, ``τ_MTL = Σ_t τ_t``, ``m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|]``.
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression"
    (ICML 2024). Computed one tensor at a time in float32; only mergeable keys get masks.

    Args:
        base: Pre-trained state dict ``θ_0``.
        experts: Task -> fine-tuned state dict ``θ_t``.
        lambdas: ``λ`` for every task, or a mapping with exactly one ``λ_t ≥ 0`` per task.

    Returns:
        Task -> tensor name -> bool mask (shape of the tensor).

    Raises:
        MergeError: Incompatible experts (see ``check_compatible``) or bad ``lambdas``.

    """
    check_compatible(base, experts)
    tasks = list(experts)
    lam = _lambda_tensor(lambdas, tasks)
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for name, b in base.items():
        if not is_mergeable(name, b):
            continue
        b32 = b.to(_F32)
        stacked = torch.stack(
            [experts[t][name].to(device=b.device, dtype=_F32) - b32 for t in tasks]
        )
        m = tall_mask_stack(stacked, lam)
        for i, t in enumerate(tasks):
            out[t][name] = m[i].clone()
    return out


def tall_masks_from_vectors(
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    lambdas: float | Mapping[str, float],
    mtl: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """TALL masks from precomputed task vectors.

    ``m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|]`` with ``τ_MTL = Σ_t τ_t`` unless ``mtl`` is given
    (e.g. a TIES-merged vector, as the paper also allows). Wang et al., "Localizing Task
    Information for Improved Model Merging and Compression" (ICML 2024).

    Args:
        task_vectors: Task -> tensor name -> ``τ_t`` (all tasks with the same keys/shapes).
        lambdas: ``λ`` for all tasks, or one ``λ_t ≥ 0`` per task.
        mtl: Optional multi-task vector with the same keys.

    Returns:
        Task -> tensor name -> bool mask.

    Raises:
        MergeError: No task vectors, mismatched keys/shapes (naming task and key), bad
            ``lambdas``.

    """
    if not task_vectors:
        raise MergeError("no task vectors given")
    tasks = list(task_vectors)
    first = task_vectors[tasks[0]]
    keys = list(first)
    for t in tasks[1:]:
        tv = task_vectors[t]
        missing = [k for k in keys if k not in tv]
        if missing:
            raise MergeError(f"task vector '{t}' is missing key '{missing[0]}'")
        extra = sorted(set(tv) - set(keys))
        if extra:
            raise MergeError(f"task vector '{t}' has extra key '{extra[0]}'")
        for k in keys:
            if tv[k].shape != first[k].shape:
                raise MergeError(
                    f"task vector '{t}': tensor '{k}' has shape {tuple(tv[k].shape)}, "
                    f"task '{tasks[0]}' has {tuple(first[k].shape)}"
                )
    if mtl is not None:
        missing = [k for k in keys if k not in mtl]
        if missing:
            raise MergeError(f"mtl vector is missing key '{missing[0]}'")
        for k in keys:
            if mtl[k].shape != first[k].shape:
                raise MergeError(
                    f"mtl vector: tensor '{k}' has shape {tuple(mtl[k].shape)}, "
                    f"expected {tuple(first[k].shape)}"
                )
    lam = _lambda_tensor(lambdas, tasks)
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for k in keys:
        dev = first[k].device
        stacked = torch.stack([task_vectors[t][k].to(device=dev, dtype=_F32) for t in tasks])
        m = tall_mask_stack(stacked, lam, None if mtl is None else mtl[k])
        for i, t in enumerate(tasks):
            out[t][k] = m[i].clone()
    return out


def consensus_mask(
    masks: Mapping[str, Mapping[str, torch.Tensor]], k: int = 2
) -> dict[str, torch.Tensor]:
    """Consensus mask: entries that at least ``k`` task masks select.

    ``m_cons = 1[Σ_t m_t ≥ k]``. ``k = 2`` (default, as in the paper) removes both
    "selfish" weights (used by one task only) and "catastrophic" ones (used by none).
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression"
    (ICML 2024). ``k = 0`` keeps everything; ``k`` larger than the number of tasks keeps
    nothing.

    Args:
        masks: Task -> tensor name -> bool mask (same keys/shapes for every task).
        k: Minimum number of agreeing tasks, an int ``≥ 0``.

    Returns:
        Tensor name -> bool mask.

    Raises:
        MergeError: No masks, mismatched keys or shapes, or invalid ``k``.

    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise MergeError(f"consensus_mask: k must be an int >= 0, got {k!r}")
    if not masks:
        raise MergeError("consensus_mask: no masks given")
    tasks = list(masks)
    keys = list(masks[tasks[0]])
    out: StateDict = {}
    for t in tasks[1:]:
        if set(masks[t]) != set(keys):
            diff = sorted(set(masks[t]) ^ set(keys))
            raise MergeError(f"consensus_mask: task '{t}' disagrees on key '{diff[0]}'")
    for name in keys:
        ref = masks[tasks[0]][name]
        count = torch.zeros(ref.shape, dtype=torch.int32, device=ref.device)
        for t in tasks:
            m = masks[t][name]
            if m.shape != ref.shape:
                raise MergeError(
                    f"consensus_mask: task '{t}' mask '{name}' has shape {tuple(m.shape)}, "
                    f"expected {tuple(ref.shape)}"
                )
            count += m.to(device=ref.device, dtype=torch.bool)
        out[name] = count >= k
    return out
