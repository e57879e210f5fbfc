"""The retrain deployment end to end on real servers: Prefect server + process worker, MLflow server
with S3 artifacts, moto S3 as the DVC remote; then a fresh clone's ``mergeflow pull``.

The deployment runs on a copy of the session's ci workspace (every stage already run by
``dvc repro``) with a parameter change passed as the run's ``overrides``: the stage items it
touches run under the worker, the rest are skipped, and every output — run here or before — is
pushed, tagged and pulled back. A second full ci-size pipeline would prove nothing more and cost
~6 min of CI (issue 24). Then two simultaneous reruns (the deployment's concurrency limit
serializes them; both skip every stage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.conftest import copy_workspace
from tests.integration.conftest import BIN, SECRET, _boto_kw, aws_env, start, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.e2e]

MODEL = "mergeflow-merged"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# The run's params change: evaluate (and audit, which reads evaluate.batch_size) rerun, and the
# run registers a model. The stack also commits a change to stages/prepare.py: every prepare item
# reruns, its output byte-identical, so nothing else downstream of it does.
CHANGE = {"evaluate": {"batch_size": 32}}


def _poll(fn, timeout_s: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what} not within {timeout_s} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ci_workspace, moto_s3, mlflow_server, prefect_server):
    """Env wiring all servers, a copy of the ci workspace, the deployment and a running worker."""
    api, penv = prefect_server
    d = tmp_path_factory.mktemp("retrain")
    ws = copy_workspace(ci_workspace, d / "ws")
    with open(ws / "stages" / "prepare.py", "a") as f:
        f.write("# changed by test_servers\n")
    git = ["git", "-c", "user.email=t@localhost", "-c", "user.name=t"]
    subprocess.run([*git, "commit", "-qam", "prepare changed"], cwd=ws, check=True)
    env = {
        **os.environ,
        **penv,
        **aws_env(moto_s3),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MERGEFLOW_S3_BUCKET": "mergeflow-dvc",
        "MERGEFLOW_S3_ENDPOINT": moto_s3,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MERGEFLOW_TRACKING", None)
    dep = subprocess.run(
        [sys.executable, str(ws / "flows" / "deploy.py"), "--source", str(ws), "--workspace", str(ws)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert dep.returncode == 0, dep.stderr[-3000:]
    dep_id = dep.stdout.strip().splitlines()[-1]
    worker = start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process"],
        d / "worker.log", env,
    )
    try:
        yield {"api": api, "env": env, "ws": ws, "dep": dep_id, "dir": d, "s3": moto_s3,
               "mlflow": mlflow_server, "worker_log": d / "worker.log"}
    finally:
        stop(worker, grace_s=5)  # the worker first, then the servers (fixture teardown order)


def _api(stack, method: str, path: str, **kw):
    """One Prefect API call, retried like Prefect's own client on 429/502/503: the SQLite-backed
    server answers 503 while its database is locked (seen in CI as two runs were created at
    once); the failed request's transaction was rolled back, so a retry is safe."""
    for attempt in range(10):
        r = httpx.request(method, stack["api"] + path, timeout=30, **kw)
        if r.status_code not in (429, 502, 503) or attempt == 9:
            break
        time.sleep(1 + attempt)
    r.raise_for_status()
    return r.json()


def _run_deployment(stack, **parameters) -> str:
    """A flow run of the deployment (``parameters`` merged over the deployment's)."""
    body = {"parameters": parameters} if parameters else {}
    return _api(stack, "POST", f"/deployments/{stack['dep']}/create_flow_run", json=body)["id"]


def _wait(stack, run_id: str, timeout_s: float) -> dict:
    def done():
        fr = _api(stack, "GET", f"/flow_runs/{run_id}")
        return fr if fr["state_type"] in TERMINAL else None

    try:
        return _poll(done, timeout_s, f"flow run {run_id}", every=3)
    except TimeoutError:
        print(stack["worker_log"].read_text()[-5000:])
        raise


def _artifact(stack, run_id: str, key: str) -> str:
    arts = _api(stack, "POST", "/artifacts/filter",
                json={"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}})
    return arts[0]["data"] if arts else ""


def _stage_results(stack, run_id: str) -> dict[str, str]:
    table = _artifact(stack, run_id, "stages")
    rows = [r.split("|") for r in table.splitlines()[2:]]
    return {r[1].strip().strip("`"): r[2].strip() for r in rows}


def test_scheduler_creates_runs_for_the_cron_deployment(stack):
    dep = _api(stack, "GET", f"/deployments/{stack['dep']}")
    assert dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert dep["work_pool_name"] == "gpu"
    assert dep["global_concurrency_limit"]["limit"] == 1

    def scheduled():
        flt = {"deployment_id": {"any_": [stack["dep"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}
        runs = _api(stack, "POST", "/flow_runs/filter", json={"flow_runs": flt})
        return [r for r in runs if r["auto_scheduled"]]

    runs = _poll(scheduled, 90, "scheduler-created runs")
    assert all(r["expected_start_time"][11:16] == "03:00" for r in runs)


def test_retrain_runs_what_changed_then_skips_pushes_registers_and_pull_restores(stack):
    """Catches: a deployment that ignores its ``overrides``, reruns up-to-date stages, or pushes,
    tags or restores only the outputs of the stages it ran."""
    from mlflow import MlflowClient

    ws = stack["ws"]
    first = _run_deployment(stack, overrides=CHANGE)
    fr = _wait(stack, first, 1500)
    assert fr["state_type"] == "COMPLETED", stack["worker_log"].read_text()[-5000:]
    results = _stage_results(stack, first)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert set(results) == set(lock), (
        _artifact(stack, first, "stages"), sorted(lock), stack["worker_log"].read_text()[-5000:]
    )
    expected = {k for k in lock if k.startswith("prepare@")} | {"evaluate", "audit"}
    assert {k for k, v in results.items() if v == "ran"} == expected, results
    assert {v for k, v in results.items() if k not in expected} == {"skipped"}
    assert yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["batch_size"] == 32
    assert "mean normalized" in _artifact(stack, first, "summary")
    assert "finetune@rotten_tomatoes" in _artifact(stack, first, "dvc-lock")

    # two retrains at once: the deployment's concurrency limit runs them one after the other
    a, b = _run_deployment(stack), _run_deployment(stack)
    ra, rb = _wait(stack, a, 600), _wait(stack, b, 600)
    assert ra["state_type"] == rb["state_type"] == "COMPLETED"
    (s1, e1), (s2, e2) = sorted([(ra["start_time"], ra["end_time"]), (rb["start_time"], rb["end_time"])])
    assert e1 <= s2, "two retrains overlapped on one workspace"
    for r in (a, b):
        assert set(_stage_results(stack, r).values()) == {"skipped"}

    # MLflow: one parent per flow run, a nested run per stage item, DVC md5s, Prefect ids
    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("mergeflow")
    parents = client.search_runs([exp.experiment_id], "tags.`mergeflow.kind` = 'flow'")
    by_flow = {p.data.tags["prefect.flow_run_id"]: p for p in parents}
    assert set(by_flow) == {first, a, b}
    parent = by_flow[first]
    assert parent.data.tags["prefect.flow_run_url"].endswith(first)
    assert parent.data.tags["mlflow.source.git.commit"] != "unknown"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["mergeflow.stage"] for c in children} == expected  # a run per item that ran
    for entry in lock.values():  # the parent is tagged with every output, run now or before
        for out in entry.get("outs", []):
            assert parent.data.tags[f"dvc.out.{out['path']}.md5"] == out["md5"], out["path"]
    ev = next(c for c in children if c.data.tags["mergeflow.stage"] == "evaluate")
    out = lock["evaluate"]["outs"][0]
    assert ev.data.tags[f"dvc.out.{out['path']}.md5"] == out["md5"]
    assert ev.data.tags["prefect.flow_run_id"] == first
    prep = next(c for c in children if c.data.tags["mergeflow.stage"] == "prepare@bbc_news")
    assert {i.dataset.name for i in prep.inputs.dataset_inputs} == {"bbc_news"}
    assert all(i.dataset.digest for i in prep.inputs.dataset_inputs)
    # the model registry: one version (the reruns evaluated nothing new), candidate and champion
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1
    mv = client.get_model_version_by_alias(MODEL, "candidate")
    assert mv.run_id == parent.info.run_id
    assert client.get_model_version_by_alias(MODEL, "champion").version == mv.version
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "model")}
    assert {"model/encoder.safetensors", "model/merge.json", "model/heads"} <= files

    # the bucket holds every cached output's DVC object
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack["s3"], **_boto_kw())
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="mergeflow-dvc", Prefix="dvc/") for o in page.get("Contents", [])}
    pushed = [o for e in lock.values() for o in e.get("outs", []) if o["md5"].endswith(".dir")]
    assert pushed and all(f"dvc/files/md5/{o['md5'][:2]}/{o['md5'][2:]}" in keys for o in pushed)

    # fresh clones: `mergeflow pull <mlflow run id>` and `mergeflow pull <git rev>` restore the md5s
    from mergeflow.io import tree_md5

    for ref, name in ((parent.info.run_id, "by-run"), ("HEAD", "by-rev")):
        clone = stack["dir"] / name
        subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
        p = subprocess.run([str(BIN / "mergeflow"), "pull", ref, "--root", str(clone)],
                           env=stack["env"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        for o in (o for e in lock.values() for o in e.get("outs", [])):
            assert tree_md5(clone / o["path"]) == tree_md5(ws / o["path"]), (name, o["path"])

    # no secret anywhere: MLflow params/tags of every run, Prefect artifacts and logs, DVC config
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    for r in (first, a, b):
        arts = _api(stack, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [r]}}})
        logs = _api(stack, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [r]}}})
        assert arts and logs and SECRET not in json.dumps(arts) + json.dumps(logs)
    for cfg in (ws / ".dvc").glob("config*"):
        assert SECRET not in cfg.read_text()


def test_champion_moves_only_to_a_better_candidate(stack, tmp_path, monkeypatch):
    from mergeflow import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["mlflow"])
    monkeypatch.delenv("MERGEFLOW_TRACKING", raising=False)
    monkeypatch.delenv("MERGEFLOW_PARENT_RUN_ID", raising=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "merge.json").write_text("{}")
    champs = []
    for score in (0.80, 0.70, 0.90, 0.90):
        with tracking.flow_run("promotion", tmp_path) as fr:
            mv = tracking.register_candidate(fr, tmp_path / "m", "promotion-test", score)
        from mlflow import MlflowClient

        c = MlflowClient(stack["mlflow"])
        assert c.get_model_version_by_alias("promotion-test", "candidate").version == mv.version
        champs.append(c.get_model_version_by_alias("promotion-test", "champion").version)
    assert champs == ["1", "1", "3", "3"]
