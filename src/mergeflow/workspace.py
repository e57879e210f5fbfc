"""Fresh pipeline workspaces: a copy of the repo's pipeline files as a new git + DVC repo.

Used by the end-to-end tests and the benchmarks, so both run the pipeline exactly as a user's
clone would, with a params profile (e.g. ``configs/ci.yaml``) merged into ``params.yaml``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mergeflow.config import deep_merge, parse_params
from mergeflow.yamlio import (
    dump_yaml_roundtrip,
    load_yaml,
    load_yaml_file,
    load_yaml_roundtrip,
    update_roundtrip,
)

PIPELINE_FILES = (
    "dvc.yaml",
    "params.yaml",
    "stages/",
    "src/",
    "configs/",
    "flows/",
    ".dvc/",
    ".dvcignore",
)


def _copy_local_task_files(src_root: Path, dest: Path, params: Any) -> None:
    """Copy the files of ``local_tasks`` entries that live in ``src_root`` (their DVC deps)."""
    local = params.get("local_tasks") if isinstance(params, dict) else None
    for entry in (local or {}).values():
        rel = Path(str(entry.get("path", ""))) if isinstance(entry, dict) else None
        if rel is None or rel.is_absolute() or not (src_root / rel).exists():
            continue  # absolute paths stay where they are; a missing file fails in prepare
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src_root / rel).is_dir():
            shutil.copytree(src_root / rel, dest / rel, dirs_exist_ok=True)
        else:
            shutil.copy2(src_root / rel, dest / rel)


def make_workspace(
    src_root: Path, dest: Path, profile: Path | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """Copy the pipeline files of ``src_root`` (tracked or not ignored) into ``dest``, commit them.

    Args:
        src_root: The mergeflow repo.
        dest: An empty directory.
        profile: A YAML file of params overrides (merged first).
        overrides: More overrides (merged last); may be invalid on purpose (tests of bad input).
            The files of ``local_tasks`` entries found under ``src_root`` are copied too.

    Returns:
        ``dest``.
    """
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=src_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in [*files, ".dvc/config", ".dvc/.gitignore", ".dvcignore"]:
        if f.startswith(PIPELINE_FILES) and (src_root / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_root / f, dest / f)
    doc, text = load_yaml_roundtrip(src_root / "params.yaml")  # comments kept
    if profile is not None:
        override = load_yaml_file(profile) or {}
        from mergeflow.methods.params import check_config

        merged = deep_merge(load_yaml(text, str(src_root / "params.yaml")), override)
        check_config(parse_params(merged, source=str(profile)), str(profile))
        update_roundtrip(doc, override)
    update_roundtrip(doc, overrides or {})
    final = dump_yaml_roundtrip(doc, text)
    (dest / "params.yaml").write_text(final)
    _copy_local_task_files(src_root, dest, load_yaml(final, str(dest / "params.yaml")))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(
        [*dvc, "config", "--local", "core.site_cache_dir", str(dest / ".dvc-site")],
        cwd=dest,
        check=True,
    )
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(
        [
            "git",
            "-c",
            "user.email=mergeflow@localhost",
            "-c",
            "user.name=mergeflow",
            "commit",
            "-qm",
            "workspace",
        ],
        cwd=dest,
        check=True,
    )
    return dest
