"""Merge-method registry and the built-in methods.

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
from mergeflow.methods.registry import (
    MethodParams,
    MethodSpec,
    available,
    describe_params,
    get,
    merge,
    merge_grid,
    register,
)

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
