"""Hyper-parameters of merge methods: the base model, validation, and help text.

Each method's hyper-parameters are a frozen pydantic model (:class:`MethodParams`). The help
text and the error messages are read from the model's own JSON schema
(``model_json_schema()``: type, ``description``, ``default`` and the ``minimum`` /
``exclusiveMinimum`` / ``maximum`` / ``exclusiveMaximum`` bounds its ``Field`` declares), so a
field documents itself once, where it is declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mergeflow.methods.registry import MethodSpec, get
from mergeflow.tensors import MergeError

__all__ = ["MethodParams", "check_config", "describe_model", "describe_params", "validate"]

_TYPES = {
    "number": "float",
    "integer": "int",
    "string": "str",
    "boolean": "bool",
    "null": "None",
}
# (schema key, text before the name, text after it)
_BOUNDS = (
    ("exclusiveMinimum", "{} < ", ""),
    ("minimum", "{} <= ", ""),
    ("exclusiveMaximum", "", " < {}"),
    ("maximum", "", " <= {}"),
)


class MethodParams(BaseModel):
    """Base class for method hyper-parameter models: frozen, unknown keys rejected, finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _type_text(s: Mapping[str, Any]) -> str:
    if "enum" in s:
        return "one of " + ", ".join(repr(v) for v in s["enum"])
    if "const" in s:
        return repr(s["const"])
    if "anyOf" in s:
        return " | ".join(_type_text(b) for b in s["anyOf"])
    t = s.get("type")
    if t == "object":
        inner = s.get("additionalProperties")
        return f"dict[str, {_type_text(inner)}]" if isinstance(inner, Mapping) else "dict"
    if t == "array":
        inner = s.get("items")
        return f"list[{_type_text(inner)}]" if isinstance(inner, Mapping) else "list"
    return _TYPES.get(str(t), str(t))


def _range_text(fname: str, s: Mapping[str, Any]) -> str | None:
    for branch in (s, *s.get("anyOf", ())):  # a bound on the number branch of `float | None`
        lo = next((f.format(branch[k]) for k, f, _ in _BOUNDS[:2] if k in branch), "")
        hi = next((g.format(branch[k]) for k, _, g in _BOUNDS[2:] if k in branch), "")
        if lo or hi:
            return f"{lo}{fname}{hi}"
    return None


def describe_model(model: type[BaseModel]) -> dict[str, str]:
    """One line per field, from the model's JSON schema.

    Args:
        model: A hyper-parameter model.

    Returns:
        Field name -> e.g. ``"density: float, 0 < density <= 1, fraction k of |τ| kept by the
        trim, default 0.2"``.

    """
    props = model.model_json_schema().get("properties", {})
    out = {}
    for fname, s in props.items():
        parts = [f"{fname}: {_type_text(s)}"]
        rng = _range_text(fname, s)
        if rng:
            parts.append(rng)
        if s.get("description"):
            parts.append(s["description"])
        if "default" in s:
            parts.append(f"default {s['default']!r}")
        out[fname] = ", ".join(parts)
    return out


def describe_params(name: str) -> dict[str, str]:
    """Human-readable description of each hyper-parameter of a registered method.

    Args:
        name: Registry name.

    Returns:
        Field name -> one line (see :func:`describe_model`).

    Raises:
        MergeError: If the method is unknown.

    """
    return describe_model(get(name).params_model)


def validate(spec: MethodSpec, hyperparams: Mapping[str, Any]) -> BaseModel:
    """Build the method's parameter model, or raise one message naming every bad key.

    Args:
        spec: The method.
        hyperparams: User hyper-parameters.

    Returns:
        The validated, frozen parameter model.

    Raises:
        MergeError: ``unknown hyperparameter 'x' for method 'm' … Accepted hyperparameters: …``
            or ``invalid hyperparameter 'x'=v for method 'm': <reason>; allowed: <rule>``, the
            rule naming the type, the range and the meaning of the field.

    """
    try:
        return spec.params_model(**hyperparams)
    except ValidationError as exc:
        rules = describe_model(spec.params_model)
        unknown: list[str] = []
        by_key: dict[str, list[Any]] = {}
        for err in exc.errors():
            loc = tuple(err.get("loc") or ())
            key = str(loc[0]) if loc else "(all)"
            if err["type"] == "extra_forbidden":
                unknown.append(key)
            else:
                by_key.setdefault(key, []).append(err)
        problems = [f"unknown hyperparameter '{k}' for method '{spec.name}'" for k in unknown]
        for key, errs in by_key.items():
            # For unions, the most specific branch (deepest location) explains best.
            err = max(errs, key=lambda e: len(e.get("loc") or ()))
            if key in rules:
                value = hyperparams.get(key, err.get("input"))
                problems.append(
                    f"invalid hyperparameter '{key}'={value!r} for method '{spec.name}': "
                    f"{err['msg']}; allowed: {rules[key]}"
                )
            else:
                problems.append(f"invalid hyperparameters for method '{spec.name}': {err['msg']}")
        msg = "; ".join(problems)
        if unknown:
            msg += f". Accepted hyperparameters: {'; '.join(rules.values()) or 'none'}"
        raise MergeError(msg) from None


def check_config(params: Any, source: str = "params.yaml") -> None:
    """Check ``evaluate.methods`` of validated params against the registry.

    Every entry must name a registered method and give hyper-parameters its model accepts, and
    ``compress.twin_shared`` must be one of them.
    Called by the commands that validate a whole params file (``mergeflow check-params``,
    ``use-profile``, the flow, new workspaces) and by the stages that merge (coefficients,
    compress, evaluate, audit) — not by :func:`mergeflow.config.parse_params`, so the stages that
    never merge do not import, and do not depend on, the methods' code.

    Args:
        params: :class:`mergeflow.config.Params`.
        source: Name used in error messages.

    Raises:
        mergeflow.config.ConfigError: Naming the method or the hyper-parameter and what is allowed.
    """
    from mergeflow.config import ConfigError, _format_error
    from mergeflow.methods.registry import available

    names = available()
    for name, hp in params.evaluate.methods.items():
        if name not in names:
            raise ConfigError(
                f"{source}: evaluate.methods: unknown method {name!r}; available: {', '.join(names)}"
            )
        try:
            get(name).params_model.model_validate(hp)
        except ValidationError as err:
            raise ConfigError(_format_error(err, f"{source}: evaluate.methods.{name}")) from None
    if params.compress.twin_shared not in params.evaluate.methods:
        raise ConfigError(
            f"{source}: compress.twin_shared: {params.compress.twin_shared!r} must be one of "
            f"evaluate.methods ({', '.join(params.evaluate.methods)}), whose scaling it reuses"
        )
