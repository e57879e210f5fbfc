"""Task catalogue: real text-classification tasks shipped inside registry packages.

Typical use::

    from mergeflow.data import load_task, make_splits, write_splits, get_task

    texts, labels, names = load_task("rotten_tomatoes")
    splits = make_splits(texts, labels, seed=0, n_train=2000, n_val=200, n_test=500)
    write_splits(out_dir, splits, spec=get_task("rotten_tomatoes"), extra_meta={"seed": 0})
"""

from mergeflow.data.catalogue import (
    BUILTIN_TASKS,
    TaskSpec,
    available_tasks,
    get_task,
    load_task,
    register_task,
    task_provenance,
    unregister_task,
)
from mergeflow.data.errors import DataError
from mergeflow.data.local import load_local, local_task, register_local_task
from mergeflow.data.sources import PackageSource, default_cache_dir
from mergeflow.data.splits import SPLITS, make_splits, read_meta, read_split, write_splits
from mergeflow.data.text import Text, is_pair, split_pairs

__all__ = [
    "BUILTIN_TASKS",
    "SPLITS",
    "Text",
    "DataError",
    "PackageSource",
    "TaskSpec",
    "available_tasks",
    "default_cache_dir",
    "get_task",
    "is_pair",
    "load_local",
    "local_task",
    "load_task",
    "make_splits",
    "read_meta",
    "read_split",
    "register_local_task",
    "register_task",
    "split_pairs",
    "task_provenance",
    "unregister_task",
    "write_splits",
]
