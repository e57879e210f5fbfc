"""The pipeline flow's orchestration against real DVC and a real (test-harness) Prefect API.

A tiny DAG shaped like the real one (prepare@* -> finetune@* -> join) with sub-second commands:
fan-out, DVC bookkeeping under the lock, skips, retries on I/O stages only, timeouts, params
overrides, the workspace lock, an unreachable MLflow server, and a flow killed mid-stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc
from tests.integration.conftest import ROOT, free_port, make_tiny_repo, read_jsonl

pytestmark = [pytest.mark.integration]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _no_lineage(monkeypatch):
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    monkeypatch.delenv("MERGEFLOW_S3_BUCKET", raising=False)


def _tiny(tmp_path: Path, monkeypatch, **control) -> tuple[Path, Path]:
    ws = tmp_path / "ws"
    ctl = make_tiny_repo(ws, control)
    monkeypatch.setenv("TINY_CONTROL", str(ctl))
    return ws, Path(json.loads(ctl.read_text())["log"])


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` has exited (or is a zombie) within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.2)
    return False


def _overlap(runs: list[dict], names: set[str]) -> bool:
    rs = [r for r in runs if r["name"] in names]
    return any(
        a["start"] < b["end"] and b["start"] < a["end"] for a in rs for b in rs if a is not b
    )


def test_fan_out_runs_in_parallel_commits_to_dvc_and_skips_on_rerun(
    tmp_path, monkeypatch, prefect_harness
):
    """Catches: a fan-out run one item at a time. Each prepare@* / finetune@* waits (≤ 60 s) until
    all three of its group have started and records whether they did; only concurrent siblings can
    all see that, however slow the machine (no timing window to miss)."""
    from flows.pipeline import pipeline, stage_plan

    groups = [[f"{s}@{t}" for t in "abc"] for s in ("prepare", "finetune")]
    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1, rendezvous=groups)
    plan = {s.name: s for s in stage_plan(ws)}
    assert plan["finetune@a"].upstream == ("prepare@a",)
    assert set(plan["join"].upstream) == {"finetune@a", "finetune@b", "finetune@c"}

    results = pipeline(root=str(ws), max_parallel=3)
    assert set(results.values()) == {"ran"} and len(results) == 7
    met = {r["name"]: r["met"] for r in read_jsonl(log / "rendezvous.jsonl")}
    assert met == {n: True for g in groups for n in g}  # all three of each group were in flight
    runs = read_jsonl(log / "runs.jsonl")
    assert _overlap(runs, {"prepare@a", "prepare@b", "prepare@c"})
    assert _overlap(runs, {"finetune@a", "finetune@b", "finetune@c"})
    by = {r["name"]: r for r in runs}
    for t in "abc":  # dependency order still holds inside the fan-out
        assert by[f"prepare@{t}"]["end"] <= by[f"finetune@{t}"]["start"]
    assert by["join"]["start"] >= max(by[f"finetune@{t}"]["end"] for t in "abc")
    # the fan-out shares the cores: 2 threads per command at most on a 2-core box with 3 in flight
    omp = {a["name"]: a["omp"] for a in read_jsonl(log / "attempts.jsonl")}
    assert omp["finetune@a"] == str(max(1, (os.cpu_count() or 1) // 3))
    # DVC agrees everything is recorded: `dvc status` clean, `dvc repro` has nothing to do
    assert json.loads(dvc(ws, "status", "--json").stdout) == {}
    assert "Data and pipelines are up to date" in dvc(ws, "repro").stdout

    results = pipeline(root=str(ws))
    assert set(results.values()) == {"skipped"}
    assert len(read_jsonl(log / "runs.jsonl")) == 7


def test_params_override_reruns_only_dependent_stage_and_bad_override_is_rejected(
    tmp_path, monkeypatch, prefect_harness
):
    from flows.pipeline import pipeline
    from mergeflow.config import ConfigError

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1)
    pipeline(root=str(ws))
    results = pipeline(root=str(ws), overrides={"seed": 7})
    assert results["join"] == "ran"
    assert [k for k, v in results.items() if v == "ran"] == ["join"]
    assert yaml.safe_load((ws / "params.yaml").read_text())["seed"] == 7

    before = (ws / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="finetune"):
        pipeline(root=str(ws), overrides={"finetune": {"steps": -3}})
    assert (ws / "params.yaml").read_text() == before  # nothing written


def test_io_stage_failing_once_is_retried_and_flow_completes(
    tmp_path, monkeypatch, prefect_harness
):
    from flows.pipeline import pipeline

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1, fail_once=["prepare@b"])
    results = pipeline(root=str(ws))
    assert set(results.values()) == {"ran"}
    attempts = [a["name"] for a in read_jsonl(log / "attempts.jsonl")]
    assert attempts.count("prepare@b") == 2 and attempts.count("prepare@a") == 1
    assert json.loads(dvc(ws, "status", "--json").stdout) == {}


def test_compute_stage_is_not_retried(tmp_path, monkeypatch, prefect_harness):
    from flows.pipeline import pipeline

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1, fail_once=["finetune@b"])
    with pytest.raises(RuntimeError, match="finetune@b failed"):
        pipeline(root=str(ws))
    attempts = [a["name"] for a in read_jsonl(log / "attempts.jsonl")]
    assert attempts.count("finetune@b") == 1
    assert "join" not in attempts
    # the failed item is not recorded in dvc.lock; the next run picks it up and completes
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert "finetune@b" not in lock and "finetune@a" in lock
    results = pipeline(root=str(ws))
    assert results["finetune@b"] == "ran" and results["finetune@a"] == "skipped"


def test_stage_timeout_kills_the_command(tmp_path, monkeypatch, prefect_harness):
    """Catches: a timeout that is reported but leaves the command running — the join command
    (60 s of sleep) must be gone afterwards (its pid, recorded when it started, is dead)."""
    from flows.pipeline import pipeline

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1, sleep={"join": 60})
    with pytest.raises(Exception, match="timed out after 3 s"):
        pipeline(root=str(ws), stage_timeout_s=3)
    pid = next(a["pid"] for a in read_jsonl(log / "attempts.jsonl") if a["name"] == "join")
    assert _gone(pid, within_s=30), f"the timed-out command (pid {pid}) is still running"
    assert "join" not in [r["name"] for r in read_jsonl(log / "runs.jsonl")]
    assert "join" not in yaml.safe_load((ws / "dvc.lock").read_text())["stages"]


def test_second_flow_on_the_same_workspace_is_refused(tmp_path, monkeypatch, prefect_harness):
    from flows.pipeline import WorkspaceBusyError, pipeline, workspace_lock

    ws, _ = _tiny(tmp_path, monkeypatch)
    with workspace_lock(ws), pytest.raises(WorkspaceBusyError, match="another flow run"):
        pipeline(root=str(ws))


def test_serial_mode_matches_parallel_mode(tmp_path, monkeypatch, prefect_harness):
    from flows.pipeline import pipeline

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.2)
    results = pipeline(root=str(ws), parallel=False)
    assert set(results.values()) == {"ran"}
    assert not _overlap(read_jsonl(log / "runs.jsonl"), {f"prepare@{t}" for t in "abc"})
    assert set(pipeline(root=str(ws), parallel=True).values()) == {"skipped"}


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_mlflow_server_down_is_an_explicit_error_before_any_stage(
    server, tmp_path, monkeypatch, prefect_harness, black_hole
):
    """Catches: a flow that starts stages without its tracking server, or that retries or hangs
    on one that accepts connections and never answers ("silent": exactly one connection, one
    ``GET /health`` with its timeout — counted, not timed)."""
    from flows.pipeline import pipeline
    from mergeflow.tracking import TrackingUnavailableError

    ws, log = _tiny(tmp_path, monkeypatch)
    dead = black_hole.url if server == "silent" else f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MERGEFLOW_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    with pytest.raises(TrackingUnavailableError, match=dead.replace(".", r"\.")):
        pipeline(root=str(ws))
    assert not (log / "attempts.jsonl").exists()
    if server == "silent":
        assert black_hole.connections() == 1


def test_flow_killed_mid_stage_leaves_nothing_recorded_and_rerun_completes(
    tmp_path, monkeypatch, prefect_harness
):
    """SIGKILL the flow process (and its stage) mid-stage; the rerun redoes exactly that stage."""
    from prefect.settings import PREFECT_API_URL

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1, sleep={"join": 30})
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flows.pipeline import pipeline; "
    code += f"pipeline(root={str(ws)!r})"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a generous bound on reaching join on a loaded box
        while "join" not in [a["name"] for a in read_jsonl(log / "attempts.jsonl")]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (ws / "out" / "join").exists()
    assert "join" not in yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    ctl = Path(os.environ["TINY_CONTROL"])
    ctl.write_text(json.dumps({**json.loads(ctl.read_text()), "sleep": {}}))
    from flows.pipeline import pipeline

    results = pipeline(root=str(ws))
    assert results["join"] == "ran" and results["finetune@a"] == "skipped"
    assert json.loads(dvc(ws, "status", "--json").stdout) == {}


def test_a_stage_killed_mid_run_leaves_no_running_mlflow_run(
    tmp_path, monkeypatch, prefect_harness
):
    """A stage process SIGKILLed inside its MLflow run cannot end it; its flow task does (FAILED),
    while the stages beside it finish their own runs."""
    from mlflow import MlflowClient

    from flows.pipeline import pipeline
    from mergeflow.tracking import EXPERIMENT, tracking_uri

    ws, log = _tiny(tmp_path, monkeypatch, default_sleep=0.1, tracked=True, kill=["finetune@b"])
    monkeypatch.setenv("MERGEFLOW_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ws)  # MLflow puts the new store's artifacts under the creator's cwd
    with pytest.raises(Exception, match=r"finetune@b failed \(exit (-9|137)\)"):
        pipeline(root=str(ws), max_parallel=3)
    client = MlflowClient(tracking_uri=tracking_uri(ws))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    status = {r.data.tags.get("mergeflow.stage", "flow"): r.info.status for r in runs}
    assert status["finetune@b"] == "FAILED" and status["flow"] == "FAILED"
    assert status["prepare@a"] == "FINISHED" and "RUNNING" not in status.values(), status


def test_unreachable_s3_remote_fails_the_flow_before_any_stage(
    tmp_path, monkeypatch, prefect_harness
):
    from flows.pipeline import pipeline
    from mergeflow.remote import RemoteError

    ws, log = _tiny(tmp_path, monkeypatch)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MERGEFLOW_S3_BUCKET", "mergeflow-dvc")
    monkeypatch.setenv("MERGEFLOW_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(RemoteError, match=endpoint.replace(".", r"\.") + ".*"):
        pipeline(root=str(ws))
    assert not (log / "attempts.jsonl").exists()
