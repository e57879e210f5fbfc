"""Shared fixtures: isolated homes for Prefect/DVC/MLflow and the ci-size pipeline workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergeflow.workspace import make_workspace as _make_workspace

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Keep Prefect, MLflow and DVC state out of $HOME; telemetry off; shared download cache."""
    home = tmp_path_factory.mktemp("home")
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("MERGEFLOW_CACHE", str(Path.home() / ".cache" / "mergeflow"))
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    yield


def make_workspace(dest: Path, overrides: dict | None = None) -> Path:
    """A fresh git+DVC workspace with the ci profile (plus ``overrides``)."""
    return _make_workspace(ROOT, dest, ROOT / "configs" / "ci.yaml", overrides)


def copy_workspace(src: Path, dest: Path) -> Path:
    """A private copy of a workspace (for a test that changes it): files, git, DVC cache, and
    its own DVC site cache dir (the copied config would point at the original's).

    The DVC cache's files are hard links (DVC writes each cache entry once, read-only, by its
    md5, and never changes it in place), so a copy costs about the workspace's outputs, not
    twice that; every other file is copied.
    """
    import shutil

    cache = (src / ".dvc" / "cache").resolve()

    def link_cache(s: str, d: str) -> str:
        if Path(s).resolve().is_relative_to(cache):
            os.link(s, d)
            return d
        return shutil.copy2(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=link_cache)
    shutil.rmtree(dest / ".dvc-site", ignore_errors=True)
    dvc(dest, "config", "--local", "core.site_cache_dir", str(dest / ".dvc-site"))
    return dest


def dvc(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc`` in a workspace."""
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=ws, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def ci_workspace(tmp_path_factory) -> Path:
    """The ci-size pipeline reproduced once (shared by the e2e and integration tests; a test
    that changes it works on a :func:`copy_workspace`).

    ``MERGEFLOW_CI_WORKSPACE=<dir>``: use that workspace instead, one already reproduced with
    the ci profile (to iterate on tests without a new run); it must be up to date.
    """
    given = os.environ.get("MERGEFLOW_CI_WORKSPACE")
    if given:
        ws = Path(given).resolve()
        status = dvc(ws, "status", "--json").stdout.strip()
        assert status == "{}", f"MERGEFLOW_CI_WORKSPACE={ws} is not up to date: {status[:2000]}"
        return ws
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    proc = dvc(ws, "repro")
    (ws / "repro.log").write_text(proc.stdout + proc.stderr)
    return ws
