"""Merge-method registry: name -> (per-tensor kernel, hyper-parameter model, paper).

A merge method is one function over one tensor, ``kernel(inp, params, ctx) -> τ_merged``:
``inp`` (:class:`~mergeflow.methods.chunks.TensorInputs`) holds the base tensor ``θ_0`` and a
reader for each expert's ``θ_t``; the kernel returns the merged task vector of that tensor in
float32, and the caller forms ``θ = θ_0 + λ·τ_merged`` (Ilharco et al., "Editing Models with Task
Arithmetic", ICLR 2023). A method whose formula needs the whole model (a global TIES threshold,
PCB's statistics) also registers ``prepare(params, source) -> ctx``, run once per merge; its
result is the kernel's ``ctx`` (``None`` without one). The in-memory merge
(:func:`mergeflow.methods.merge`), the λ grid (:func:`mergeflow.methods.merge_grid`) and the
streaming engine (``mergeflow merge``) all call these two functions and nothing else.

Adding a method = one module under ``mergeflow/methods`` with ``@register(...)`` on its kernel +
one import line in ``mergeflow/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from mergeflow.methods.chunks import Source, TensorInputs
from mergeflow.tensors import MergeError

__all__ = ["Kernel", "MethodSpec", "Prepare", "available", "get", "register"]

Kernel = Callable[[TensorInputs, Any, Any], torch.Tensor]
Prepare = Callable[[Any, Source], Any]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    Attributes:
        name: Registry name (e.g. ``"ties"``).
        kernel: ``kernel(inp, params, ctx) -> τ_merged`` of one tensor (float32, ``inp.base``'s
            number of entries).
        params_model: Frozen pydantic model (``extra="forbid"``) of the hyper-parameters.
        paper: Citation of the paper the method implements.
        prepare: Optional ``prepare(params, source) -> ctx``, once per merge.

    """

    name: str
    kernel: Kernel
    params_model: type[BaseModel]
    paper: str
    prepare: Prepare | None = None


_REGISTRY: dict[str, MethodSpec] = {}

_K = TypeVar("_K", bound=Callable[..., torch.Tensor])


def register(
    name: str, params_model: type[BaseModel], paper: str, prepare: Prepare | None = None
) -> Callable[[_K], _K]:
    """Register a merge method's kernel under ``name`` (decorator).

    Example::

        @register("task_arithmetic", TaskArithmeticParams, paper="Ilharco et al., ICLR 2023")
        def task_arithmetic(inp, params, ctx): ...

    Args:
        name: Registry name.
        params_model: Pydantic model class; must be frozen and use ``extra="forbid"``.
        paper: Citation string.
        prepare: Optional whole-model step, see the module doc.

    Returns:
        Decorator that stores a :class:`MethodSpec` and returns the kernel unchanged.

    Raises:
        TypeError: If ``params_model`` is not a frozen, ``extra="forbid"`` pydantic model.
        ValueError: If ``name`` is already taken by a different kernel.

    """
    if not (isinstance(params_model, type) and issubclass(params_model, BaseModel)):
        raise TypeError(f"method '{name}': params_model must be a pydantic BaseModel subclass")
    cfg = params_model.model_config
    if cfg.get("extra") != "forbid" or not cfg.get("frozen"):
        raise TypeError(f"method '{name}': params_model must set frozen=True and extra='forbid'")

    def deco(kernel: _K) -> _K:
        old = _REGISTRY.get(name)
        where = (kernel.__module__, kernel.__qualname__)
        if old is not None and (old.kernel.__module__, old.kernel.__qualname__) != where:
            raise ValueError(
                f"merge method '{name}' is already registered by "
                f"{old.kernel.__module__}.{old.kernel.__qualname__}"
            )
        _REGISTRY[name] = MethodSpec(name, kernel, params_model, paper, prepare)
        return kernel

    return deco


def available() -> list[str]:
    """Return the sorted names of all registered merge methods.

    Returns:
        Sorted list of method names, e.g. ``["consensus", "dare", "task_arithmetic", "ties"]``.

    """
    return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
    """Look up a merge method.

    Args:
        name: Registry name.

    Returns:
        The :class:`MethodSpec` (kernel, prepare step, hyper-parameter model, paper citation).

    Raises:
        MergeError: ``unknown method 'x'; available: ...``.

    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown method {name!r}; available: {', '.join(available())}") from None
