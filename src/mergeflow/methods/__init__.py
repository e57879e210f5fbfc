"""Merge methods: one module per method (its per-tensor kernel + typed params), and the registry.

Adding a method = one module in this package + one line in the import block below (importing
a method module registers it).
"""

from mergeflow.methods import (  # noqa: F401  (imported for their @register side effect)
    breadcrumbs,
    consensus,
    dare,
    emr,
    pcb,
    prune_suspect,
    task_arithmetic,
    ties,
    tsv,
)
from mergeflow.methods.grid import merge_grid
from mergeflow.methods.merging import merge
from mergeflow.methods.params import MethodParams, describe_params
from mergeflow.methods.registry import MethodSpec, available, get, register

__all__ = [
    "MethodParams",
    "MethodSpec",
    "available",
    "describe_params",
    "get",
    "merge",
    "merge_grid",
    "register",
]
