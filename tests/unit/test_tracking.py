"""Lineage: each stage process logs its own MLflow run; the flow closes the runs of killed stages."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from mergeflow import tracking


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace as cwd, lineage on, the default (./mlflow.db) store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    for var in ("MERGEFLOW_PARENT_RUN_ID", "MERGEFLOW_FLOW_RUN_ID", "MERGEFLOW_FLOW_RUN_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "out.txt").write_text("y")
    return tmp_path


def _client(root):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.mark.parametrize("preset", [False, True])
def test_opening_a_store_leaves_the_env_uri_as_it_was(workspace, monkeypatch, preset):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later stage subprocess would then log
    into the previous workspace's store instead of its own (seen as a flaky lineage test in CI)."""
    before = f"sqlite:///{workspace / 'preset.db'}" if preset else None
    if before is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    with tracking.stage_run("probe", {"a": 1}):  # the workspace store (env, else ./mlflow.db)
        pass
    tracking._mlflow(f"sqlite:///{workspace / 'other.db'}")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('MLFLOW_TRACKING_URI'))"],
        capture_output=True, text=True, check=True,
    )
    assert child.stdout.strip() == str(before)


def test_stage_run_records_the_whole_lineage(workspace, monkeypatch):
    """Params, input/output md5s, git commit, tags, metrics by step, artifacts, datasets, and the
    flow's ids: all in one FINISHED run nested under the flow's parent run."""
    with tracking.flow_run("flow", workspace, prefect_run_id="pf-1", prefect_run_url="http://u") as fl:
        env = fl.env()
    assert env["MERGEFLOW_PARENT_RUN_ID"] == fl.run_id and env["MERGEFLOW_FLOW_RUN_ID"] == "pf-1"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with tracking.stage_run(
        "probe@t", {"a": {"b": 1}, "long": "z" * 7000}, inputs={"x": workspace / "in.txt"},
        tags={"task": "t"},
    ) as tr:
        tr.metrics({"loss": 0.5}, step=0)
        tr.metrics({"loss": 0.25, "nested": {"acc": 1}, "label": "not a number"}, step=1)
        tr.outputs({"o": workspace / "out.txt"})
        tr.dataset("t/val", "c" * 64, str(workspace), "run1 (labels used): val n=3")
        tr.dataset("t/test", "d" * 64, str(workspace), "run2 (labels NOT used): test n=3")
        tr.artifact(workspace / "out.txt")
        run_id = tr.run_id
    client = _client(workspace)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1", "long": "z" * 6000}
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == fl.run_id
    assert tags["prefect.flow_run_id"] == "pf-1" and tags["prefect.flow_run_url"] == "http://u"
    assert tags["mergeflow.stage"] == "probe@t" and tags["task"] == "t"
    assert tags["input.x.md5"] == hashlib.md5(b"x").hexdigest()
    assert tags["output.o.md5"] == hashlib.md5(b"y").hexdigest()
    assert tags["mlflow.source.git.commit"] == tracking.git_commit(workspace)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (0, 0.5),
        (1, 0.25),
    ]
    assert run.data.metrics["nested.acc"] == 1.0 and "label" not in run.data.metrics
    assert [f.path for f in client.list_artifacts(run_id)] == ["out.txt"]
    assert list((workspace / "mlruns").rglob("out.txt"))  # the workspace's artifact store
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["t/test", "t/val"]
    contexts = {r[0] for r in sqlite3.connect(workspace / "mlflow.db").execute(
        "select value from input_tags"
    )}
    assert {"run1 (labels used): val n=3", "run2 (labels NOT used): test n=3"} <= contexts
    assert os.environ.get("MLFLOW_TRACKING_URI") == env["MLFLOW_TRACKING_URI"]


def test_artifact_and_outputs_are_read_before_the_call_returns(workspace):
    """A stage logs an artifact from its temp dir and renames the dir right after."""
    tmp = workspace / "out.tmp"
    tmp.mkdir()
    (tmp / "w.bin").write_bytes(b"weights")
    before = tracking.tree_md5(tmp)
    with tracking.stage_run("probe", {"a": 1}) as tr:
        tr.artifact(tmp / "w.bin", "coef")
        tr.outputs({"o": tmp})
        (tmp / "w.bin").write_bytes(b"changed")
        tmp.rename(workspace / "out")
        run_id = tr.run_id
    client = _client(workspace)
    assert [f.path for f in client.list_artifacts(run_id, "coef")] == ["coef/w.bin"]
    assert client.get_run(run_id).data.tags["output.o.md5"] == before


def test_a_stage_that_raises_ends_its_run_failed(workspace):
    with pytest.raises(KeyError), tracking.stage_run("probe", {"a": 1}) as tr:
        run_id = tr.run_id
        raise KeyError("stage broke")
    assert _client(workspace).get_run(run_id).info.status == "FAILED"


def test_a_logging_error_names_the_call_and_fails_the_run(workspace):
    with pytest.raises(tracking.TrackingError, match=r"artifact.*mlflow\.db"):
        with tracking.stage_run("probe", {"a": 1}) as tr:
            run_id = tr.run_id
            tr.artifact(workspace / "missing.txt")
    assert _client(workspace).get_run(run_id).info.status == "FAILED"


def test_nothing_is_logged_when_lineage_is_off(workspace, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    with tracking.stage_run("probe", {"a": 1}) as tr:
        tr.metrics({"m": 1.0})
        assert tr.run_id == ""
    assert not (workspace / "mlflow.db").exists()


def test_data_stage_and_tracking_import_without_torch():
    """The data stage and the lineage module do not pay for importing torch (nor MLflow)."""
    code = (
        "import sys\nimport mergeflow.pipeline.prepare, mergeflow.tracking, mergeflow.stage\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_STAGE = """
import os, signal, sys, time
from mergeflow import tracking
with tracking.stage_run(sys.argv[1], {"p": 1}) as tr:
    tr.metrics({"m": 2.0})
    print(tr.run_id, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[2]))
"""


def test_runs_of_a_killed_stage_are_failed_and_its_siblings_left_running(workspace):
    """SIGKILL leaves a stage's run RUNNING; fail_orphaned_runs ends exactly that item's runs."""
    with tracking.flow_run("flow", workspace) as fl:
        env = {**os.environ, **fl.env()}

        def stage(name: str, how: str) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-c", _STAGE, name, how], env=env, stdout=subprocess.PIPE,
                text=True,
            )

        sibling = stage("s@b", "120")
        killed = stage("s@a", "die")
        killed_id = killed.stdout.readline().strip()
        assert killed.wait(120) == -signal.SIGKILL
        sibling_id = sibling.stdout.readline().strip()
        client = _client(workspace)
        assert client.get_run(killed_id).info.status == "RUNNING"
        assert tracking.fail_orphaned_runs(fl.env(), "s@a") == [killed_id]
        assert client.get_run(killed_id).info.status == "FAILED"
        assert client.get_run(killed_id).data.metrics["m"] == 2.0
        assert client.get_run(sibling_id).info.status == "RUNNING"
        assert tracking.fail_orphaned_runs(fl.env(), "s@a") == []
        sibling.kill()
        sibling.wait()
    assert tracking.fail_orphaned_runs({}, "s@a") == []  # lineage off: nothing to do
