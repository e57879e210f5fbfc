"""Content hashes of artifacts, as recorded in MLflow lineage (md5 matches DVC's)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _hash_file(path: str | os.PathLike, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    """MD5 of a file's bytes (the hash DVC records for files)."""
    return _hash_file(path, "md5")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    return _hash_file(path, "sha256")


def tree_md5(path: str | os.PathLike) -> str:
    """One MD5 over a file or a directory tree (relative paths and file md5s, sorted).

    Hidden files are skipped, so the value depends only on the artifact's content.
    """
    p = Path(path)
    if p.is_file():
        return file_md5(p)
    h = hashlib.md5()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{file_md5(f)}\n".encode())
    return h.hexdigest()
