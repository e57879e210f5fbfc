"""Merge-method registry: name -> (function, validated hyper-parameters, citation).

A method is a function ``fn(base, experts, params) -> StateDict`` registered with
:func:`register`. It may assume :func:`mergeflow.tensors.check_compatible` has passed and that
``params`` is an instance of its frozen pydantic model. It must return exactly ``base``'s keys
in ``base``'s dtypes; :func:`merge` verifies that contract on every call.

Adding a method = one module under ``mergeflow/methods`` + one import line in
``mergeflow/methods/__init__.py``.
"""

from __future__ import annotations

import hashlib
import threading
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import annotated_types
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from mergeflow.tensors import (
    MergeError,
    StateDict,
    all_finite,
    check_compatible,
    is_mergeable,
    per_task,
)

__all__ = [
    "MethodSpec",
    "MethodParams",
    "available",
    "get",
    "merge",
    "merge_grid",
    "register",
    "describe_params",
    "assemble",
    "stacked_deltas",
    "per_task",
    "mergeable_keys",
    "tensor_seed",
]

_F32 = torch.float32

MergeFn = Callable[[StateDict, Mapping[str, StateDict], Any], StateDict]


class MethodParams(BaseModel):
    """Base class for method hyper-parameter models: frozen, unknown keys rejected, finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    Attributes:
        name: Registry name (e.g. ``"ties"``).
        fn: ``fn(base, experts, params) -> StateDict``; ``params`` is a ``params_model``.
        params_model: Frozen pydantic model (``extra="forbid"``) of the hyper-parameters.
        paper: Citation of the paper the method implements.

    """

    name: str
    fn: MergeFn
    params_model: type[BaseModel]
    paper: str


_REGISTRY: dict[str, MethodSpec] = {}

_F = TypeVar("_F", bound=Callable[..., StateDict])


def register(name: str, params_model: type[BaseModel], paper: str) -> Callable[[_F], _F]:
    """Register a merge method under ``name`` (decorator).

    Example::

        @register("task_arithmetic", TaskArithmeticParams, paper="Ilharco et al., ICLR 2023")
        def task_arithmetic(base, experts, params): ...

    Args:
        name: Registry name.
        params_model: Pydantic model class; must be frozen and use ``extra="forbid"``.
        paper: Citation string.

    Returns:
        Decorator that stores a :class:`MethodSpec` and returns the function unchanged.

    Raises:
        TypeError: If ``params_model`` is not a frozen, ``extra="forbid"`` pydantic model.
        ValueError: If ``name`` is already taken by a different function.

    """
    if not (isinstance(params_model, type) and issubclass(params_model, BaseModel)):
        raise TypeError(f"method '{name}': params_model must be a pydantic BaseModel subclass")
    cfg = params_model.model_config
    if cfg.get("extra") != "forbid" or not cfg.get("frozen"):
        raise TypeError(f"method '{name}': params_model must set frozen=True and extra='forbid'")

    def deco(fn: _F) -> _F:
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(
                f"merge method '{name}' is already registered by "
                f"{old.fn.__module__}.{old.fn.__qualname__}"
            )
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, params_model=params_model, paper=paper)
        return fn

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
        The :class:`MethodSpec` (function, hyper-parameter model, paper citation).

    Raises:
        MergeError: ``unknown method 'x'; available: ...``.

    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown method {name!r}; available: {', '.join(available())}") from None


# --------------------------------------------------------------------------- hyper-parameters


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if isinstance(ann, type) and origin is None:
        return "None" if ann is type(None) else ann.__name__
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return str(ann).replace("typing.", "")


def _range_text(fname: str, info: FieldInfo) -> str | None:
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Gt):
            lo = f"{m.gt} < "
        elif isinstance(m, annotated_types.Ge):
            lo = f"{m.ge} <= "
        elif isinstance(m, annotated_types.Lt):
            hi = f" < {m.lt}"
        elif isinstance(m, annotated_types.Le):
            hi = f" <= {m.le}"
    if lo is None and hi is None:
        return None
    return f"{lo or ''}{fname}{hi or ''}"


def _describe_field(fname: str, info: FieldInfo) -> str:
    parts = [f"{fname}: {_type_name(info.annotation)}"]
    rng = _range_text(fname, info)
    if rng:
        parts.append(rng)
    if info.description:
        parts.append(info.description)
    if not info.is_required():
        parts.append(f"default {info.default!r}")
    return ", ".join(parts)


def describe_params(name: str) -> dict[str, str]:
    """Human-readable description of each hyper-parameter of a method.

    Args:
        name: Registry name.

    Returns:
        Field name -> ``"density: float, 0 < density <= 1, ..., default 0.2"``.

    Raises:
        MergeError: If the method is unknown.

    """
    model = get(name).params_model
    return {f: _describe_field(f, info) for f, info in model.model_fields.items()}


def _validate_params(spec: MethodSpec, hyperparams: Mapping[str, Any]) -> BaseModel:
    try:
        return spec.params_model(**hyperparams)
    except ValidationError as exc:
        fields = spec.params_model.model_fields
        unknown: list[str] = []
        by_key: dict[str, list[Any]] = {}
        for err in exc.errors():
            loc = tuple(err.get("loc") or ())
            key = str(loc[0]) if loc else "(all)"
            if err["type"] == "extra_forbidden":
                unknown.append(key)
            else:
                by_key.setdefault(key, []).append(err)
        problems: list[str] = []
        for key in unknown:
            problems.append(f"unknown hyperparameter '{key}' for method '{spec.name}'")
        for key, errs in by_key.items():
            # For unions, the most specific branch (deepest location) explains best.
            err = max(errs, key=lambda e: len(e.get("loc") or ()))
            value = hyperparams.get(key, err.get("input"))
            if key in fields:
                rule = _describe_field(key, fields[key])
                problems.append(
                    f"invalid hyperparameter '{key}'={value!r} for method '{spec.name}': "
                    f"{err['msg']}; allowed: {rule}"
                )
            else:
                problems.append(f"invalid hyperparameters for method '{spec.name}': {err['msg']}")
        msg = "; ".join(problems)
        if unknown:
            accepted = "; ".join(_describe_field(f, i) for f, i in fields.items()) or "none"
            msg += f". Accepted hyperparameters: {accepted}"
        raise MergeError(msg) from None


# --------------------------------------------------------------------------- merge entry point


def merge(
    name: str,
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    /,
    **hyperparams: Any,
) -> StateDict:
    """Merge ``experts`` into ``base`` with a registered method.

    Steps: look up ``name``; validate ``hyperparams`` against the method's pydantic model;
    :func:`~mergeflow.tensors.check_compatible`; run the method (float32 compute, one tensor at
    a time); verify the result has exactly ``base``'s keys, shapes and dtypes, and finite
    values. Non-mergeable (int/bool) tensors are copied from ``base``. All methods produce
    ``θ = θ_0 + λ·τ_merged`` for a method-specific ``τ_merged`` (Ilharco et al., "Editing
    Models with Task Arithmetic", ICLR 2023, and the papers cited in each method).

    Args:
        name: Method name, see :func:`available`.
        base: Pre-trained state dict ``θ_0``.
        experts: Task name -> fine-tuned state dict ``θ_t``.
        **hyperparams: Method hyper-parameters (see :func:`describe_params`).

    Returns:
        Merged state dict in ``base``'s key order and dtypes.

    Raises:
        MergeError: Unknown method, unknown / out-of-range hyper-parameter (naming it and the
            allowed range), incompatible experts, or a merged value that overflows the base
            dtype.

    """
    spec = get(name)
    params = _validate_params(spec, hyperparams)
    check_compatible(base, experts)
    out = spec.fn(dict(base), {t: dict(sd) for t, sd in experts.items()}, params)
    if list(out) != list(base):
        missing = sorted(set(base) - set(out))
        extra = sorted(set(out) - set(base))
        raise MergeError(
            f"method '{name}' returned the wrong keys (missing {missing[:3]}, extra {extra[:3]})"
        )
    for k, b in base.items():
        o = out[k]
        if o.dtype != b.dtype or o.shape != b.shape:
            raise MergeError(
                f"method '{name}' returned tensor '{k}' as {o.dtype}{tuple(o.shape)}, "
                f"expected {b.dtype}{tuple(b.shape)}"
            )
    return out


class _Capture(threading.local):
    """Per-thread sink for the τ_merged pairs that :func:`assemble` consumes."""

    active: bool = False
    box: dict[str, torch.Tensor] | None = None
    calls: int = 0


_CAPTURE = _Capture()


def merge_grid(
    name: str,
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    scalings: Sequence[float],
    /,
    **hyperparams: Any,
) -> Iterator[tuple[float, StateDict]]:
    """``merge(name, …, scaling=λ, …)`` for every λ in ``scalings``, running the method once.

    Every registered method ends in ``assemble(θ_0, τ_merged, λ)`` with a ``τ_merged`` that
    does not depend on λ (``θ = θ_0 + λ·τ_merged``; the registry's contract test checks it).
    The first λ runs the method and records ``τ_merged``; each further λ only re-runs
    :func:`assemble` on the recorded tensors, the same float32 arithmetic as a direct call, so
    the results are bitwise equal to separate :func:`merge` calls. A method that did not go
    through exactly one :func:`assemble` call is simply re-run per λ.

    Args:
        name: Method name.
        base: ``θ_0``.
        experts: Task -> ``θ_t``.
        scalings: The λ values, in the order to yield them.
        **hyperparams: Other method hyper-parameters (not ``scaling``).

    Yields:
        ``(λ, merged state dict)`` pairs, one merged model resident at a time beyond ``τ_merged``.
    """
    if "scaling" in hyperparams:
        raise MergeError("merge_grid: pass the scalings as a list, not as a 'scaling' hyperparam")
    lams = list(scalings)
    if not lams:
        return
    box: dict[str, torch.Tensor] = {}
    _CAPTURE.active, _CAPTURE.box, _CAPTURE.calls = True, box, 0
    try:
        first = merge(name, base, experts, scaling=lams[0], **hyperparams)
        calls = _CAPTURE.calls
    finally:
        _CAPTURE.active, _CAPTURE.box, _CAPTURE.calls = False, None, 0
    yield lams[0], first
    del first
    reuse = calls == 1 and set(box) == set(mergeable_keys(base))
    for lam in lams[1:]:
        if reuse:
            yield lam, assemble(base, box.items(), lam)
        else:
            yield lam, merge(name, base, experts, scaling=lam, **hyperparams)


# --------------------------------------------------------------------------- helpers for methods


def mergeable_keys(base: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of ``base`` that are merged (floating point), in ``base``'s order.

    Args:
        base: Pre-trained state dict.

    Returns:
        List of keys for which :func:`mergeflow.tensors.is_mergeable` holds.

    """
    return [k for k, v in base.items() if is_mergeable(k, v)]


def stacked_deltas(
    base: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    name: str,
) -> torch.Tensor:
    """Stack the task vectors of one tensor, ``[τ_1[name]; …; τ_T[name]]``, in float32.

    ``τ_t = θ_t − θ_0`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).
    Only one tensor's expert copies are resident at a time.

    Args:
        base: Pre-trained state dict.
        experts: Task name -> fine-tuned state dict.
        name: Tensor key.

    Returns:
        Float32 tensor of shape ``(T, *base[name].shape)`` on ``base[name]``'s device.

    """
    b = base[name].to(_F32)
    out = torch.empty((len(experts), *b.shape), dtype=_F32, device=b.device)
    for i, sd in enumerate(experts.values()):
        torch.sub(sd[name].to(device=b.device, dtype=_F32), b, out=out[i])
    return out


def assemble(
    base: Mapping[str, torch.Tensor],
    deltas: Iterable[tuple[str, torch.Tensor]] | Iterator[tuple[str, torch.Tensor]],
    scaling: float = 1.0,
) -> StateDict:
    """Build the merged model ``θ = θ_0 + λ·τ_merged`` tensor by tensor.

    Consumes ``(name, τ_merged[name])`` pairs lazily (so a generator keeps only one tensor's
    working set alive), computes in float32, casts to the base dtype, copies non-mergeable
    keys from ``base``. Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).

    Args:
        base: Pre-trained state dict ``θ_0``.
        deltas: Pairs for every mergeable key of ``base``.
        scaling: ``λ``.

    Returns:
        Merged state dict, ``base``'s keys, order and dtypes.

    Raises:
        MergeError: If a mergeable key got no delta, or a merged value is not finite in the
            base dtype (e.g. float16 overflow).

    """
    box = None
    if _CAPTURE.active:  # merge_grid is recording: count every call, keep the first one's τ
        _CAPTURE.calls += 1
        box = _CAPTURE.box if _CAPTURE.calls == 1 else None
    merged: dict[str, torch.Tensor] = {}
    for name, d in deltas:
        if box is not None:  # a view would keep its whole parent (e.g. all T rows) alive
            box[name] = d if d._base is None else d.clone()
        b = base[name]
        m = (b.to(_F32) + d.to(device=b.device, dtype=_F32) * scaling).to(b.dtype)
        if not all_finite(m):
            raise MergeError(
                f"merged tensor '{name}' is not finite in {b.dtype} (overflow? lower the scaling)"
            )
        merged[name] = m
    out: StateDict = {}
    for name, b in base.items():
        if not is_mergeable(name, b):
            out[name] = b.clone()
        elif name in merged:
            out[name] = merged[name]
        else:
            raise MergeError(f"internal: no merged value produced for tensor '{name}'")
    return out


def tensor_seed(seed: int, task: str, name: str) -> int:
    """Deterministic 63-bit seed for one (task, tensor) pair.

    ``blake2b(f"{seed}|{task}|{name}")`` — stable across processes (unlike ``hash``) and
    independent of dict order, so a random merge (DARE, Yu et al., ICML 2024) is reproducible.

    Args:
        seed: User seed.
        task: Task name.
        name: Tensor key.

    Returns:
        Non-negative integer < 2**63 for ``torch.Generator.manual_seed``.

    """
    h = hashlib.blake2b(f"{seed}\x1f{task}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
