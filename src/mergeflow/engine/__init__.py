"""Streaming, bounded-memory merge engine over (sharded) safetensors, local or on S3.

Imports are lazy so that ``mergeflow --help`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Checkpoint", "MergeReport", "check_same_architecture", "merge_checkpoints"]


def __getattr__(name: str) -> Any:
    if name in ("Checkpoint", "check_same_architecture"):
        from mergeflow.engine import checkpoint

        return getattr(checkpoint, name)
    if name in ("MergeReport", "merge_checkpoints"):
        from mergeflow.engine import run

        return getattr(run, name)
    raise AttributeError(name)
