"""Lineage plumbing: opening MLflow in-process must not redirect the stages it later spawns."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys

import pytest

from mergeflow import tracking
from tests.helpers import live_processes, wait_for


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


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace as cwd, lineage on, the default (./mlflow.db) store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    monkeypatch.delenv("MERGEFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "0")  # a sidecar per stage; agent tests opt in
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "out.txt").write_text("y")
    return tmp_path


def _client(root):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_sidecar_logs_everything_a_stage_run_logs(workspace):
    """Stage processes log through a sidecar process: same run contents as in-process logging."""
    import hashlib

    with tracking.sidecar():
        assert tracking._SIDECAR is not None
        with tracking.stage_run(
            "probe@t", {"a": {"b": 1}}, inputs={"x": workspace / "in.txt"}, tags={"task": "t"}
        ) as tr:
            tr.metrics({"loss": 0.5}, step=0)
            tr.metrics({"loss": 0.25, "nested": {"acc": 1}}, step=1)
            tr.outputs({"o": workspace / "out.txt"})
            tr.dataset("t/val", "c" * 64, str(workspace), "val n=3")
            tr.artifact(workspace / "out.txt")
            run_id = tr.run_id
        proc = tracking._SIDECAR.proc
    assert tracking._SIDECAR is None and proc.returncode == 0
    client = _client(workspace)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1"}
    tags = run.data.tags
    assert tags["mergeflow.stage"] == "probe@t" and tags["task"] == "t"
    assert tags["input.x.md5"] == hashlib.md5(b"x").hexdigest()
    assert tags["output.o.md5"] == hashlib.md5(b"y").hexdigest()
    assert "mlflow.source.git.commit" in tags
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (0, 0.5),
        (1, 0.25),
    ]
    assert run.data.metrics["nested.acc"] == 1.0
    assert [f.path for f in client.list_artifacts(run_id)] == ["out.txt"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["t/val"]


@pytest.mark.parametrize("via", ["sidecar", "agent", "flow"])
def test_artifact_and_outputs_are_read_before_the_call_returns(workspace, monkeypatch, via):
    """A stage logs an artifact from its temp dir and renames the dir right after: the service
    must have copied (and hashed) it by then (seen as a failed DAM run in the e2e suite)."""
    tmp = workspace / "out.tmp"
    tmp.mkdir()
    (tmp / "w.bin").write_bytes(b"weights")
    before = tracking.tree_md5(tmp)
    flow = tracking.flow_run("f", workspace) if via == "flow" else contextlib.nullcontext()
    if via == "agent":
        monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "2")
    with flow as parent:
        if parent is not None:
            monkeypatch.setenv(tracking.SOCKET_ENV, parent.socket)
        with tracking.sidecar(), tracking.stage_run("probe", {"a": 1}) as tr:
            assert isinstance(
                tracking._SIDECAR, tracking._Sidecar if via == "sidecar" else tracking._SocketSink
            )
            tr.artifact(tmp / "w.bin", "coef")
            tr.outputs({"o": tmp})
            (tmp / "w.bin").write_bytes(b"changed")
            tmp.rename(workspace / "out")
            run_id = tr.run_id
    client = _client(workspace)
    assert [f.path for f in client.list_artifacts(run_id, "coef")] == ["coef/w.bin"]
    assert list((workspace / "mlruns").rglob("w.bin"))  # the workspace's artifact store
    assert client.get_run(run_id).data.tags["output.o.md5"] == before


def test_sidecar_run_fails_with_the_stage(workspace):
    with tracking.sidecar(), pytest.raises(KeyError):
        with tracking.stage_run("probe", {"a": 1}) as tr:
            run_id = tr.run_id
            raise KeyError("stage broke")
    assert _client(workspace).get_run(run_id).info.status == "FAILED"


def test_sidecar_logging_error_is_raised_at_the_end_of_the_run(workspace):
    """A call that fails in the sidecar is reported (naming the call) when the run ends."""
    with tracking.sidecar():
        with pytest.raises(tracking.TrackingError, match="artifact"):
            with tracking.stage_run("probe", {"a": 1}) as tr:
                tr.artifact(workspace / "missing.txt")
                tr.metrics({"after": 1.0})  # skipped: the run already failed to log


@pytest.mark.parametrize("agent_idle", ["0", "2"])
def test_a_killed_stage_leaves_its_run_failed(workspace, monkeypatch, agent_idle):
    """The sidecar (or the agent) sees its stage process die (end of input) and ends the open run
    FAILED."""
    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, agent_idle)
    script = (
        "import os\nfrom mergeflow import tracking\n"
        "with tracking.sidecar():\n"
        "    with tracking.stage_run('probe', {'a': 1}) as tr:\n"
        "        print(tr.run_id, flush=True)\n"
        "        os._exit(3)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == 3, child.stderr
    run_id = child.stdout.strip()
    client = _client(workspace)
    for _ in range(200):  # the sidecar outlives the stage by the time it takes to end the run
        status = client.get_run(run_id).info.status
        if status != "RUNNING":
            break
        import time

        time.sleep(0.1)
    assert status == "FAILED"


def test_sidecar_is_not_started_when_lineage_is_off(workspace, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    with tracking.sidecar():
        assert tracking._SIDECAR is None
        with tracking.stage_run("probe", {"a": 1}) as tr:
            assert tr.run_id == ""
    assert not (workspace / "mlflow.db").exists()


def test_data_stage_and_tracking_import_without_torch():
    """The data stage and the tracking sidecar do not pay for importing torch."""
    code = (
        "import sys\nimport mergeflow.pipeline.prepare, mergeflow.tracking, mergeflow.stage\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stage_processes_log_through_the_flow_service(workspace):
    """Under a flow, stage processes log via the flow process's service: no MLflow import of their
    own, side by side, nested under the flow's run; a stage that dies leaves its run FAILED."""
    stage = (
        "import os, sys\nfrom mergeflow import tracking\n"
        "with tracking.sidecar():\n"
        "    assert isinstance(tracking._SIDECAR, tracking._SocketSink)\n"
        "    with tracking.stage_run('s@' + sys.argv[1], {'p': 1}) as tr:\n"
        "        tr.metrics({'m': 2.0})\n"
        "        print(tr.run_id, flush=True)\n"
        "        if sys.argv[1] == 'die':\n"
        "            os._exit(3)\n"
        "assert 'mlflow' not in sys.modules\n"
    )
    with tracking.flow_run("flow test", workspace) as parent:
        env = {**os.environ, **parent.env()}
        assert os.path.exists(env[tracking.SOCKET_ENV])
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-c", stage, name], env=env, stdout=subprocess.PIPE, text=True
            )
            for name in ("a", "b", "die")
        }
        out = {name: p.communicate()[0].strip() for name, p in procs.items()}
        assert {name: p.returncode for name, p in procs.items()} == {"a": 0, "b": 0, "die": 3}
    assert not os.path.exists(parent.socket)  # the service stops with the flow run
    client = _client(workspace)
    for name, run_id in out.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.data.tags["mergeflow.stage"] == f"s@{name}"
        assert run.data.metrics["m"] == 2.0
        assert run.info.status == ("FAILED" if name == "die" else "FINISHED")


def _agents(sock: str) -> list[int]:
    """Pids of live tracking agents serving socket path ``sock``."""
    return live_processes("--agent", sock)


_AGENT_STAGE = (
    "import sys\nfrom mergeflow import tracking\n"
    "with tracking.sidecar():\n"
    "    assert isinstance(tracking._SIDECAR, tracking._SocketSink), tracking._SIDECAR\n"
    "    with tracking.stage_run('s@' + sys.argv[1], {'p': sys.argv[1]}) as tr:\n"
    "        tr.metrics({'m': 2.0}, step=0)\n"
    "        tr.outputs({'o': 'out.txt'})\n"
    "        print(tr.run_id, flush=True)\n"
    "assert 'mlflow' not in sys.modules\n"
)


def test_stages_of_a_bare_repro_share_one_tracking_agent(workspace, monkeypatch):
    """Without a flow, stage processes log through one long-lived agent (MLflow imported once):
    sequential and concurrent stages, each its own complete run; the agent exits when idle and
    removes its socket; a later stage starts a new one."""
    import hashlib

    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "3")
    sock = tracking.agent_path()

    def stage(*names: str) -> list[str]:
        procs = [
            subprocess.Popen([sys.executable, "-c", _AGENT_STAGE, n], stdout=subprocess.PIPE,
                             text=True)
            for n in names
        ]
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert [p.returncode for p in procs] == [0] * len(names)
        return outs

    first = stage("a")
    pids = _agents(sock)
    assert len(pids) == 1 and os.path.exists(sock)
    second = stage("b", "c", "d")  # concurrent starters, one agent
    assert _agents(sock) == pids
    client = _client(workspace)
    for name, run_id in zip("abcd", first + second, strict=True):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mergeflow.stage"] == f"s@{name}"
        assert run.data.params == {"p": name}
        assert run.data.tags["output.o.md5"] == hashlib.md5(b"y").hexdigest()
        assert run.data.metrics["m"] == 2.0
    assert wait_for(lambda: not _agents(sock)), "the idle agent did not exit"
    assert not os.path.exists(sock)
    third = stage("e")  # a new agent
    assert client.get_run(third[0]).info.status == "FINISHED"
    assert wait_for(lambda: not _agents(sock))


def test_concurrent_first_stages_start_exactly_one_agent(workspace, monkeypatch):
    """Stages that find no agent at the same moment each launch one: one binds, the rest leave."""
    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "3")
    sock = tracking.agent_path()
    procs = [
        subprocess.Popen([sys.executable, "-c", _AGENT_STAGE, n], stdout=subprocess.PIPE,
                         text=True)
        for n in "xyz"
    ]
    run_ids = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(_agents(sock)) == 1
    client = _client(workspace)
    assert {client.get_run(r).info.status for r in run_ids} == {"FINISHED"}
    assert wait_for(lambda: not _agents(sock))


def test_agent_replaces_a_stale_socket(workspace, monkeypatch):
    """A socket file left by a dead agent (killed, machine reboot of /tmp-less setups) is taken
    over instead of blocking every stage."""
    import socket

    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "2")
    sock = tracking.agent_path()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)
    stale.close()  # the file stays, nobody listens
    assert os.path.exists(sock)
    with tracking.sidecar(), tracking.stage_run("probe", {"a": 1}) as tr:
        assert isinstance(tracking._SIDECAR, tracking._SocketSink)
        run_id = tr.run_id
    assert _client(workspace).get_run(run_id).info.status == "FINISHED"
    assert len(_agents(sock)) == 1
    assert wait_for(lambda: not _agents(sock))


def test_agent_key_follows_the_logging_environment(workspace, monkeypatch):
    """Stages with another tracking URI or credentials never share an agent; per-stage ids do."""
    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "2")
    key = tracking.agent_key()
    monkeypatch.setenv("MERGEFLOW_PARENT_RUN_ID", "abc")
    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "50")
    assert tracking.agent_key() == key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")
    assert tracking.agent_key() != key
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'other.db'}")
    assert tracking.agent_key() != key
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    sub = workspace / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)  # default store ./mlflow.db: another workspace, another agent
    assert tracking.agent_key() != key


def test_a_bad_agent_setting_is_a_clear_stage_error(workspace, monkeypatch):
    from mergeflow import stage

    monkeypatch.setenv(tracking.AGENT_IDLE_ENV, "soon")
    with pytest.raises(SystemExit) as exc:
        stage.main("mergeflow.pipeline.prepare", ["--task", "x", "--out", "o"])
    assert exc.value.code == 2
