"""Artifact I/O: lazy safetensors over fsspec, atomic writes, safe output paths, hashing.

Names resolve on first use (PEP 562), so ``from mergeflow.io import tree_md5`` does not import torch
(lineage tracking and the data stage need only hashing).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOME = {
    "file_md5": "hashing",
    "file_sha256": "hashing",
    "tree_md5": "hashing",
    "OutputError": "outputs",
    "check_out": "outputs",
    "write_error": "outputs",
    "CheckpointError": "safetensors_io",
    "SafetensorsFile": "safetensors_io",
    "atomic_dir": "safetensors_io",
    "check_finite": "safetensors_io",
    "load_state_dict": "safetensors_io",
    "refuse_pickle": "safetensors_io",
    "save_state_dict": "safetensors_io",
    "write_bytes_atomic": "safetensors_io",
    "write_json_atomic": "safetensors_io",
}

__all__ = [
    "CheckpointError",
    "OutputError",
    "SafetensorsFile",
    "atomic_dir",
    "check_finite",
    "check_out",
    "file_md5",
    "file_sha256",
    "load_state_dict",
    "refuse_pickle",
    "save_state_dict",
    "tree_md5",
    "write_bytes_atomic",
    "write_error",
    "write_json_atomic",
]

if TYPE_CHECKING:
    from mergeflow.io.hashing import file_md5, file_sha256, tree_md5
    from mergeflow.io.outputs import OutputError, check_out, write_error
    from mergeflow.io.safetensors_io import (
        CheckpointError,
        SafetensorsFile,
        atomic_dir,
        check_finite,
        load_state_dict,
        refuse_pickle,
        save_state_dict,
        write_bytes_atomic,
        write_json_atomic,
    )


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'mergeflow.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mergeflow.io.{_HOME[name]}"), name)
    globals()[name] = value
    return value
