"""Real servers on 127.0.0.1 (moto S3, MLflow, Prefect), started and stopped here, and a tiny DVC repo.

Every server: a free loopback port, state in a tmp dir, a bounded wait for readiness, and a
terminate-then-kill on teardown. The tiny repo has the shape of the real DAG (``prepare@*`` →
``finetune@*`` → ``join``) with commands of a few hundred milliseconds, so the flow's fan-out,
retries, timeouts and locking are tested in seconds against real DVC.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SECRET = "mergeflow-dummy-secret-7f3a9c"  # must never appear in MLflow or Prefect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BlackHole:
    """A TCP listener on 127.0.0.1 that never accepts a request's bytes nor answers: a client's
    connection succeeds (the kernel queues it), its request then waits for its read timeout.

    ``connections()`` counts every connection made so far (accepted now, from the backlog), so a
    test can say "one request, no retries" without timing anything.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._seen: list[socket.socket] = []

    def connections(self) -> int:
        while True:
            try:
                self._seen.append(self.sock.accept()[0])
            except BlockingIOError:
                return len(self._seen)

    def close(self) -> None:
        for c in self._seen:
            c.close()
        self.sock.close()


@pytest.fixture
def black_hole():
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before {url} answered")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready within {timeout_s} s")


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
    fh = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )


def aws_env(endpoint: str, secret: str = SECRET) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "mergeflow-test-key",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A moto S3 server; yields its endpoint URL. Buckets: ``mergeflow-dvc``, ``mergeflow-mlflow``."""
    d = tmp_path_factory.mktemp("moto")
    port = free_port()
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], d / "moto.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", 300, proc)  # generous: a loaded 2-core box
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, **_boto_kw())
        for b in ("mergeflow-dvc", "mergeflow-mlflow"):
            s3.create_bucket(Bucket=b)
        yield url
    finally:
        stop(proc)


def _boto_kw() -> dict:
    e = aws_env("")
    return {
        "aws_access_key_id": e["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": e["AWS_SECRET_ACCESS_KEY"],
        "region_name": e["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_s3):
    """``mlflow server`` (sqlite backend, artifacts proxied to moto S3); yields its URI."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {
        **aws_env(moto_s3),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    proc = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination",
            "s3://mergeflow-mlflow/mlflow",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        d / "mlflow.log",
        env,
        cwd=d,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 900, proc)  # generous: a loaded 2-core box
        yield uri
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """``prefect server start`` with a fast scheduler loop; yields ``(api_url, env)``."""
    d = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {
        "PREFECT_HOME": str(d / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    proc = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        d / "prefect.log",
        env,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 900, proc)  # ~15 s when idle
        yield env["PREFECT_API_URL"], env
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prefect_harness(prefect_server):
    """In-process flows run against the session's Prefect server (one server per session: each
    ``prefect_test_harness`` started another, ~15-30 s on the 2-core box)."""
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, _ = prefect_server
    with temporary_settings(updates={PREFECT_API_URL: api}):
        # as prefect_test_harness does: also the process-global settings context, for code
        # running in a context copied before this fixture (Prefect issue 15818)
        with prefect.context._temporary_global_settings_context(
            prefect.context.get_settings_context()
        ):
            yield
            APILogWorker.drain_all(timeout=30)  # logs and events reach the server before it stops
            EventsWorker.drain_all(timeout=30)


STEP = """
import json, os, sys, time
from pathlib import Path
stage, item, out = sys.argv[1:4]
ctl = json.loads(Path(os.environ["TINY_CONTROL"]).read_text())
name = f"{stage}@{item}" if item != "-" else stage
log = Path(ctl["log"]); log.mkdir(parents=True, exist_ok=True)
t0 = time.time()
with open(log / "attempts.jsonl", "a") as f:
    f.write(json.dumps({"name": name, "start": t0, "pid": os.getpid(),
                        "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
if ctl.get("tracked"):  # an MLflow run per step; a step named in "kill" is SIGKILLed inside it
    import signal
    from mergeflow.tracking import stage_run
    with stage_run(name, {"item": item}):
        if name in ctl.get("kill", []):
            os.kill(os.getpid(), signal.SIGKILL)
if name in ctl.get("fail_once", []) and not (log / f"failed_{name}").exists():
    (log / f"failed_{name}").touch(); sys.exit("transient failure of " + name)
if name in ctl.get("fail_always", []):
    sys.exit("permanent failure of " + name)
for group in ctl.get("rendezvous", []):  # wait (bounded) until every stage of the group started
    if name in group:
        deadline, met = time.time() + ctl.get("rendezvous_timeout", 60), False
        while not met and time.time() < deadline:
            lines = (log / "attempts.jsonl").read_text().splitlines()
            met = set(group) <= {json.loads(x)["name"] for x in lines}
            time.sleep(0.05)
        with open(log / "rendezvous.jsonl", "a") as f:
            f.write(json.dumps({"name": name, "met": met}) + "\\n")
release = ctl.get("hold", {}).get(name)  # stay running until the test creates this file
deadline = time.time() + 600
while release and not Path(release).exists() and time.time() < deadline:
    time.sleep(0.05)
time.sleep(ctl.get("sleep", {}).get(name, ctl.get("default_sleep", 0.5)))
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(f"{name} {ctl.get('content', '')}")
with open(log / "runs.jsonl", "a") as f:
    f.write(json.dumps({"name": name, "start": t0, "end": time.time()}) + "\\n")
"""


def make_tiny_repo(dest: Path, control: dict) -> Path:
    """A git + DVC repo: prepare@{a,b,c} -> finetune@{a,b,c} -> join; returns the control file."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "step.py").write_text(STEP)
    items = ["a", "b", "c"]
    dvc_yaml = {
        "stages": {
            "prepare": {
                "foreach": items,
                "do": {
                    "cmd": "python step.py prepare ${item} out/prepare_${item}",
                    "deps": ["step.py"],
                    "outs": ["out/prepare_${item}"],
                },
            },
            "finetune": {
                "foreach": items,
                "do": {
                    "cmd": "python step.py finetune ${item} out/finetune_${item}",
                    "deps": ["step.py", "out/prepare_${item}"],
                    "outs": ["out/finetune_${item}"],
                },
            },
            "join": {
                "cmd": "python step.py join - out/join",
                "deps": [f"out/finetune_{i}" for i in items],
                "params": ["seed"],
                "outs": ["out/join"],
            },
        }
    }
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    from mergeflow.config import parse_params

    params = parse_params({"tasks": ["rotten_tomatoes"]}).model_dump(mode="json")  # all defaults
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ctl = dest.parent / f"{dest.name}-control.json"
    ctl.write_text(json.dumps({"log": str(dest.parent / f"{dest.name}-log"), **control}))
    (dest / ".gitignore").write_text("/out\n")
    run = lambda *a: subprocess.run(a, cwd=dest, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "config", "core.analytics", "false")
    run(str(BIN / "dvc"), "config", "--local", "core.site_cache_dir", str(dest / ".dvc-site"))
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "tiny")
    return ctl


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
