"""Compressed multi-task storage: one base, one multi-task vector, small per-task parts."""

from mergeflow.compression.tall import (
    ArchiveError,
    archive_bytes,
    export,
    iter_task,
    load,
    manifest,
    tasks_in,
    write_archive,
)

__all__ = [
    "ArchiveError",
    "archive_bytes",
    "export",
    "iter_task",
    "load",
    "manifest",
    "tasks_in",
    "write_archive",
]
