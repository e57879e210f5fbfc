"""Artifact I/O: lazy safetensors over fsspec, atomic writes, hashing."""

from mergeflow.io.hashing import file_md5, file_sha256, tree_md5
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

__all__ = [
    "CheckpointError",
    "SafetensorsFile",
    "atomic_dir",
    "check_finite",
    "file_md5",
    "file_sha256",
    "load_state_dict",
    "refuse_pickle",
    "save_state_dict",
    "tree_md5",
    "write_bytes_atomic",
    "write_json_atomic",
]
