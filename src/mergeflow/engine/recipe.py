"""YAML recipe for ``mergeflow merge --recipe FILE`` (the same fields as the flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeflow.tensors import MergeError
from mergeflow.yamlio import YAMLInputError, load_yaml_file


class Recipe(BaseModel):
    """A merge recipe.

    Example::

        method: ties
        base: s3://models/base
        experts: {sst2: ./experts/sst2, mnli: ./experts/mnli}
        out: ./merged
        params: {density: 0.2, scope: tensor}
        workers: 2
        storage_options: {client_kwargs: {endpoint_url: "http://127.0.0.1:9000"}}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    base: str
    experts: dict[str, str] = Field(min_length=0)
    out: str
    params: dict[str, Any] = Field(default_factory=dict)
    workers: int = Field(2, ge=0)
    max_shard_bytes: int = Field(2 * 1024**3, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file.

    Raises:
        MergeError: Unreadable or unsafe YAML (an alias bomb, a duplicate key, a Python tag: see
            :mod:`mergeflow.yamlio`) or unknown / missing fields (naming them).

    """
    try:
        raw = load_yaml_file(path)
    except YAMLInputError as exc:
        raise MergeError(f"recipe {exc}") from None
    except OSError as exc:
        raise MergeError(f"recipe {path}: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise MergeError(f"recipe {path}: expected a mapping at the top level")
    try:
        return Recipe(**raw)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MergeError(f"recipe {path}: {errs}") from None
