"""A λ grid over one method: the kernels run once, each λ only re-assembles ``θ_0 + λ·τ``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mergeflow.methods.chunks import StateDictSource
from mergeflow.methods.merging import assemble, deltas, resolve
from mergeflow.tensors import MergeError, StateDict, check_compatible

__all__ = ["merge_grid"]


def merge_grid(
    name: str,
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    scalings: Sequence[float],
    /,
    **hyperparams: Any,
) -> Iterator[tuple[float, StateDict]]:
    """``merge(name, …, scaling=λ, …)`` for every λ in ``scalings``, running the method once.

    Every method is ``θ(λ) = θ_0 + λ·τ_merged`` with a kernel output ``τ_merged`` that does not
    depend on λ (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023). The kernels
    run once; ``τ_merged`` is kept (one float32 copy of the mergeable tensors) and each λ runs
    :func:`~mergeflow.methods.merging.assemble` on it, the same float32 operations as a direct
    :func:`~mergeflow.methods.merging.merge` call, so the results are bitwise equal to separate
    calls.

    Args:
        name: Method name.
        base: ``θ_0``.
        experts: Task -> ``θ_t``.
        scalings: The λ values, in the order to yield them (each validated like ``scaling``).
        **hyperparams: Other method hyper-parameters (not ``scaling``).

    Yields:
        ``(λ, merged state dict)`` pairs, one merged model resident at a time beyond ``τ_merged``.

    Raises:
        MergeError: ``scaling`` among ``hyperparams``, or any error of ``merge``.

    """
    if "scaling" in hyperparams:
        raise MergeError("merge_grid: pass the scalings as a list, not as a 'scaling' hyperparam")
    lams = list(scalings)
    if not lams:
        return
    spec, params = resolve(name, {**hyperparams, "scaling": lams[0]})
    for lam in lams[1:]:
        resolve(name, {**hyperparams, "scaling": lam})
    check_compatible(base, experts)
    taus = dict(deltas(spec, params, StateDictSource(base, experts)))
    for lam in lams:
        yield lam, assemble(base, taus.items(), lam, inplace=False)
