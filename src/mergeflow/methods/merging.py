"""Whole-model merge in memory: a method's kernel over every tensor, then ``θ_0 + λ·τ_merged``.

Every method produces ``θ = θ_0 + λ·τ_merged`` (Ilharco et al., "Editing Models with Task
Arithmetic", ICLR 2023) with a method-specific ``τ_merged`` per tensor, computed by the method's
kernel (see :mod:`mergeflow.methods.registry`). :func:`deltas` and :func:`assemble_tensor` are
the two steps every caller shares: :func:`merge` here, :func:`mergeflow.methods.grid.merge_grid`
and the streaming engine (:mod:`mergeflow.engine.run`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from pydantic import BaseModel

from mergeflow.methods.chunks import Source, StateDictSource, TensorInputs
from mergeflow.methods.params import validate
from mergeflow.methods.registry import MethodSpec, get
from mergeflow.tensors import MergeError, StateDict, all_finite, check_compatible, is_mergeable

__all__ = [
    "assemble",
    "assemble_tensor",
    "deltas",
    "merge",
    "prepare",
    "resolve",
    "scaling_of",
    "tensor_delta",
]

_F32 = torch.float32


def resolve(name: str, hyperparams: Mapping[str, Any]) -> tuple[MethodSpec, BaseModel]:
    """Look up a method and validate its hyper-parameters (see :func:`~.params.validate`)."""
    spec = get(name)
    return spec, validate(spec, hyperparams)


def scaling_of(params: BaseModel) -> float:
    """``λ`` of a method's parameters (1 for a method without a ``scaling``)."""
    return float(getattr(params, "scaling", 1.0))


def prepare(spec: MethodSpec, params: BaseModel, source: Source) -> Any:
    """The method's once-per-merge context (``None`` for a method without a prepare step)."""
    return spec.prepare(params, source) if spec.prepare is not None else None


def tensor_delta(spec: MethodSpec, params: BaseModel, ctx: Any, inp: TensorInputs) -> torch.Tensor:
    """Run the method's kernel on one tensor; ``τ_merged`` shaped like the base tensor.

    Raises:
        MergeError: If the kernel returned another number of entries than the tensor has.

    """
    tau = spec.kernel(inp, params, ctx)
    if tau.numel() != inp.base.numel():
        raise MergeError(
            f"method '{spec.name}' returned {tau.numel()} values for tensor '{inp.name}' of "
            f"shape {tuple(inp.base.shape)}"
        )
    return tau.reshape(inp.base.shape)


def deltas(
    spec: MethodSpec, params: BaseModel, source: Source
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, τ_merged[name])`` for every mergeable tensor, lazily (one tensor at a time).

    Args:
        spec: The method.
        params: Its validated hyper-parameters.
        source: Where the tensors come from.

    Yields:
        Tensor name and its merged task vector (float32, the base tensor's shape).

    """
    ctx = prepare(spec, params, source)
    for name in source.names:
        yield name, tensor_delta(spec, params, ctx, source.inputs(name))


def assemble_tensor(
    name: str, base: torch.Tensor, tau: torch.Tensor, scaling: float, *, inplace: bool = True
) -> torch.Tensor:
    """``θ_0 + λ·τ`` of one tensor, computed in float32, returned in the base dtype.

    ``inplace`` reuses ``τ``'s buffer (it must then be a float32 tensor nobody else reads);
    both ways run the same two float32 operations, so the results are bitwise equal.

    Raises:
        MergeError: If a merged value is not finite in the base dtype (e.g. float16 overflow).

    """
    tau = tau.to(device=base.device, dtype=_F32)
    m = (tau.mul_(scaling) if inplace else torch.mul(tau, scaling)).add_(base).to(base.dtype)
    if not all_finite(m):
        raise MergeError(
            f"merged tensor '{name}' is not finite in {base.dtype} (overflow? lower the scaling)"
        )
    return m


def assemble(
    base: Mapping[str, torch.Tensor],
    taus: Iterable[tuple[str, torch.Tensor]],
    scaling: float,
    *,
    inplace: bool = True,
) -> StateDict:
    """Build the merged model ``θ = θ_0 + λ·τ_merged`` tensor by tensor.

    Args:
        base: Pre-trained state dict ``θ_0``.
        taus: ``(name, τ_merged[name])`` for every mergeable key of ``base``.
        scaling: ``λ``.
        inplace: Let :func:`assemble_tensor` reuse the ``τ`` buffers.

    Returns:
        Merged state dict, ``base``'s keys, order and dtypes; non-mergeable keys cloned.

    """
    merged = {k: assemble_tensor(k, base[k], t, scaling, inplace=inplace) for k, t in taus}
    return {k: merged[k] if is_mergeable(k, b) else b.clone() for k, b in base.items()}


def merge(
    name: str,
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    /,
    **hyperparams: Any,
) -> StateDict:
    """Merge ``experts`` into ``base`` with a registered method.

    Steps: look up ``name``; validate ``hyperparams`` against the method's pydantic model;
    :func:`~mergeflow.tensors.check_compatible`; run the method's prepare step and its kernel on
    every floating-point tensor (float32 compute, one tensor at a time); ``θ_0 + λ·τ_merged`` in
    the base dtype. Non-mergeable (int/bool) tensors are copied from ``base``. All methods
    produce ``θ = θ_0 + λ·τ_merged`` for a method-specific ``τ_merged`` (Ilharco et al.,
    "Editing Models with Task Arithmetic", ICLR 2023, and the papers cited in each method).

    Args:
        name: Method name, see :func:`~.registry.available`.
        base: Pre-trained state dict ``θ_0``.
        experts: Task name -> fine-tuned state dict ``θ_t``.
        **hyperparams: Method hyper-parameters (see :func:`~.params.describe_params`).

    Returns:
        Merged state dict in ``base``'s key order and dtypes.

    Raises:
        MergeError: Unknown method, unknown / out-of-range hyper-parameter (naming it and the
            allowed range), incompatible experts, or a merged value that overflows the base
            dtype.

    """
    spec, params = resolve(name, hyperparams)
    check_compatible(base, experts)
    return assemble(base, deltas(spec, params, StateDictSource(base, experts)), scaling_of(params))
