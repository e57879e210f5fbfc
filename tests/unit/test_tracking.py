"""Lineage plumbing: opening MLflow in-process must not redirect the stages it later spawns."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from mergeflow import tracking


@pytest.mark.parametrize("preset", [False, True])
def test_opening_a_store_leaves_the_env_uri_as_it_was(tmp_path, monkeypatch, preset):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later stage subprocess would then log
    into the previous workspace's store instead of its own (seen as a flaky lineage test in CI)."""
    before = f"sqlite:///{tmp_path / 'preset.db'}" if preset else None
    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("probe", {"a": 1}):  # the workspace store (env, else ./mlflow.db)
        pass
    tracking._mlflow(f"sqlite:///{tmp_path / 'other.db'}")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('MLFLOW_TRACKING_URI'))"],
        capture_output=True, text=True, check=True,
    )
    assert child.stdout.strip() == str(before)


def test_stage_run_logs_each_dataset_context(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    (tmp_path / "d").mkdir()
    with tracking.stage_run("probe", {"a": 1}) as tr:
        tr.dataset("t/val", "a" * 64, str(tmp_path / "d"), "run1 (labels used): val n=3")
        tr.dataset("t/test", "b" * 64, str(tmp_path / "d"), "run2 (labels NOT used): test n=3")
    con = sqlite3.connect(tmp_path / "mlflow.db")
    got = {r[0] for r in con.execute("select value from input_tags")}
    assert {"run1 (labels used): val n=3", "run2 (labels NOT used): test n=3"} <= got
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
