"""Credentials come only from the environment: never in MLflow, stage logs, outputs or the repo.

A real stage runs with tracking on (MLflow's local sqlite store + artifact dir), the S3 remote
variables and AWS credentials set to a marker secret; then every byte MLflow stored (params,
tags, metrics, artifacts: the whole ``mlflow.db`` and ``mlruns/``), the stage's stdout/stderr
and its output are searched for the secret. The Prefect side (artifacts, logs) and DVC's
config are checked against real servers in ``test_servers.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ROOT, SECRET, aws_env

pytestmark = [pytest.mark.integration]


def test_stage_with_tracking_never_records_the_secret(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"tasks": ["bbc_news"], "data": {"n_train": 20, "n_val": 10, "n_test": 10}}))
    env = {**os.environ, **aws_env("http://127.0.0.1:9"), "MERGEFLOW_TRACKING": "on",
           "MERGEFLOW_S3_BUCKET": "mergeflow-dvc", "MERGEFLOW_S3_ENDPOINT": "http://127.0.0.1:9",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MERGEFLOW_PARENT_RUN_ID", None)
    p = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py"), "--task", "bbc_news",
                        "--out", "data/tasks/bbc_news"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert SECRET not in p.stdout + p.stderr
    stored = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert (tmp_path / "mlflow.db").is_file() and any("meta.json" in f.name for f in stored)
    db = (tmp_path / "mlflow.db").read_bytes()
    assert b"prepare@bbc_news" in db  # the run was recorded
    for f in stored:
        assert SECRET.encode() not in f.read_bytes(), f


CREDENTIAL = re.compile(
    r"AKIA[0-9A-Z]{16}|(aws_secret_access_key|AWS_SECRET_ACCESS_KEY)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"
)


def test_no_credentials_committed_to_the_repo():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hits = []
    for name in files:
        f = Path(ROOT / name)
        if not f.is_file() or f.stat().st_size > 2_000_000:
            continue
        text = f.read_bytes().decode("utf-8", "ignore")
        hits += [f"{name}: {m.group(0)[:40]}" for m in CREDENTIAL.finditer(text)]
    assert not hits, hits
    cfg = (ROOT / ".dvc" / "config").read_text() if (ROOT / ".dvc" / "config").is_file() else ""
    assert "secret" not in cfg.lower() and "access_key" not in cfg.lower()
