"""Shared fixtures: isolated homes for Prefect/DVC/MLflow and the ci-size pipeline workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Keep Prefect, MLflow and DVC state out of $HOME; telemetry off; shared download cache."""
    home = tmp_path_factory.mktemp("home")
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("MERGEFLOW_CACHE", str(Path.home() / ".cache" / "mergeflow"))
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    yield


def make_workspace(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the project's pipeline files to ``dest`` as a fresh git+DVC repo with ci params."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = (
        "dvc.yaml",
        "params.yaml",
        "stages/",
        "src/",
        "configs/",
        "flows/",
        ".dvc/",
        ".dvcignore",
    )
    for f in files + [".dvc/config", ".dvcignore", ".dvc/.gitignore"]:
        if f.startswith(wanted) and (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    from mergeflow.config import deep_merge

    params = deep_merge(params, yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text()))
    params = deep_merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(
        [str(BIN / "dvc"), "config", "--local", "core.site_cache_dir", str(dest / ".dvc-site")],
        cwd=dest,
        check=True,
        env=env,
    )
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(
        [
            "git",
            "-c",
            "user.email=ci@example.com",
            "-c",
            "user.name=ci",
            "commit",
            "-qm",
            "workspace",
        ],
        cwd=dest,
        check=True,
    )
    return dest


def dvc(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc`` in a workspace."""
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=ws, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def ci_workspace(tmp_path_factory) -> Path:
    """The ci-size pipeline reproduced once (shared by the e2e and integration tests)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    proc = dvc(ws, "repro")
    (ws / "repro.log").write_text(proc.stdout + proc.stderr)
    return ws
