"""Live progress under the flow (issue 26) and the serial-mode timeout (issue 18), against a real
Prefect server and real DVC.

Each flow runs in its own process with its output captured, as in CI or on a worker (not a
terminal): progress must come out as plain lines, and each running item must keep a Prefect
progress artifact.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import BIN, ROOT

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def prefect_api(request) -> tuple[str, dict]:
    """``(api_url, env)`` of a real Prefect server: the session's ``prefect_server``, or one
    already running at ``$MERGEFLOW_TEST_PREFECT_API_URL`` (a developer's, on a box too loaded
    to start one in the fixture's bound)."""
    url = os.environ.get("MERGEFLOW_TEST_PREFECT_API_URL")
    if url:
        return url, {"PREFECT_API_URL": url}
    return request.getfixturevalue("prefect_server")

HOLD_STEP = """
import sys, time
from pathlib import Path
from mergeflow.progress import stage_progress
name, out, release = sys.argv[1:4]
p = stage_progress(name, min_interval_s=0.0)
p.phase("fine-tune", 10)
for i in range(1, 11):
    if i == 6:  # half way: wait (bounded) until the test has seen the artifact move
        deadline = time.time() + 600
        while not Path(release).exists() and time.time() < deadline:
            time.sleep(0.1)
    time.sleep(0.3)
    p.update(i, loss=1.0 / i)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(name)
"""

SLEEPY = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(900)
"""


def _repo(dest: Path, stages: dict, files: dict[str, str]) -> Path:
    dest.mkdir(parents=True)
    for name, text in files.items():
        (dest / name).write_text(text)
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    from mergeflow.config import parse_params

    params = parse_params({"tasks": ["rotten_tomatoes"]}).model_dump(mode="json")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("/out\n")
    run = lambda *a: subprocess.run(a, cwd=dest, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "config", "core.analytics", "false")
    run(str(BIN / "dvc"), "config", "--local", "core.site_cache_dir", str(dest / ".dvc-site"))
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "tiny")
    return dest


def _start_flow(ws: Path, prefect_env: dict, log: Path, **kwargs) -> subprocess.Popen:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flows.pipeline import pipeline; "
        f"pipeline(root={str(ws)!r}, **{kwargs!r})"
    )
    env = {**os.environ, **prefect_env, "MERGEFLOW_TRACKING": "off"}
    env.pop("MERGEFLOW_S3_BUCKET", None)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _progress_artifact(key: str, api_url: str):
    """The newest progress artifact with ``key`` (or None)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with SyncPrefectClient(api_url) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    arts = [a for a in arts if a.type == "progress"]
    return max(arts, key=lambda a: a.updated) if arts else None


def _steps(text: str, item: str, total: int) -> list[int]:
    pattern = rf"{re.escape(item)}: fine-tune: step (\d+)/{total}"
    return [int(m.group(1)) for m in re.finditer(pattern, text)]


def test_running_item_moves_its_prefect_artifact_and_prints_increasing_steps(
    tmp_path, prefect_api
):
    """Catches: a task that never mirrors the stage's progress (the artifact would sit at 0 %
    until the item ends — here the stage holds half way until the test saw it between 0 and
    100 %), a flow that prints nothing while items run, and an artifact that never completes."""
    api_url, prefect_env = prefect_api
    release = tmp_path / "release"
    ws = _repo(
        tmp_path / "ws",
        {"hold": {"foreach": ["a"], "do": {
            "cmd": f"python hold.py hold@${{item}} out/${{item}} {release}",
            "deps": ["hold.py"], "outs": ["out/${item}"]}}},
        {"hold.py": HOLD_STEP},
    )
    log = tmp_path / "flow.log"
    proc = _start_flow(ws, prefect_env, log)
    try:
        seen, deadline = None, time.monotonic() + 600  # bounds for a loaded 2-core box
        while time.monotonic() < deadline and proc.poll() is None:
            art = _progress_artifact("progress-hold-a", api_url)
            if art is not None and 0 < float(art.data) < 100:
                seen = float(art.data)
                break
            time.sleep(1)
        release.touch()
        assert seen is not None, f"the artifact never moved mid-run:\n{log.read_text()[-3000:]}"
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
    assert seen == pytest.approx(50.0)
    assert float(_progress_artifact("progress-hold-a", api_url).data) == 100.0
    text = log.read_text()
    steps = _steps(text, "hold@a", 10)
    assert 5 in steps and steps[-1] == 10 and steps == sorted(steps), text[-3000:]
    assert "mergeflow run finished" in text and "Prefect flow run: http://127.0.0.1" in text


def test_serial_timeout_kills_the_stage_process_under_dvc(tmp_path, prefect_api):
    """Issue 18: with ``parallel=False`` the command is ``dvc repro``, and the stage runs under
    it; a timeout that kills only ``dvc`` leaves the stage running (its pid is checked)."""
    _, prefect_env = prefect_api
    pid_file = tmp_path / "stage.pid"
    ws = _repo(
        tmp_path / "ws",
        {"sleepy": {"cmd": f"python sleepy.py {pid_file}", "deps": ["sleepy.py"],
                    "outs": ["out/sleepy"]}},
        {"sleepy.py": SLEEPY},
    )
    log = tmp_path / "flow.log"
    # generous: `dvc repro` must reach the stage before the timeout on a loaded machine
    proc = _start_flow(ws, prefect_env, log, parallel=False, stage_timeout_s=90)
    try:
        rc = proc.wait(900)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc != 0 and "timed out after 90 s" in text, text[-3000:]
    assert pid_file.is_file(), f"the stage never started within the timeout:\n{text[-3000:]}"
    pid = int(pid_file.read_text())
    assert _gone(pid, within_s=30), f"the stage process (pid {pid}) outlived its timeout"


def _gone(pid: int, within_s: float) -> bool:
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


@pytest.mark.slow
def test_ci_size_mergeflow_run_shows_finetune_progress_and_ends_with_a_summary(
    tmp_path, prefect_api
):
    """The issue's own test: `mergeflow run` on a fresh ci-size workspace, output captured.
    Fine-tune items print increasing steps, their Prefect progress artifacts reach 100 %, their
    loss and validation accuracy are in MLflow per step, and the run ends with the summary."""
    from mlflow import MlflowClient

    from tests.conftest import make_workspace

    api_url, prefect_env = prefect_api
    steps = 30
    ws = make_workspace(tmp_path / "ws", {"finetune": {"steps": steps, "eval_every": 10}})
    env = {**os.environ, **prefect_env, "MERGEFLOW_TRACKING": "on"}
    for k in ("MLFLOW_TRACKING_URI", "MERGEFLOW_S3_BUCKET"):
        env.pop(k, None)
    proc = subprocess.run(
        [str(BIN / "mergeflow"), "run", "--root", str(ws)], env=env, capture_output=True,
        text=True, timeout=5400,
    )
    text = proc.stdout + proc.stderr
    (tmp_path / "run.log").write_text(text)
    assert proc.returncode == 0, text[-4000:]

    found = _steps(text, "finetune@rotten_tomatoes", steps)
    assert len(set(found)) >= 2 and found == sorted(found), text[-4000:]
    assert len(found) < steps  # plain lines at a cadence, not one per step
    for task in ("rotten_tomatoes", "tweet_sentiment", "bbc_news"):
        art = _progress_artifact(f"progress-finetune-{task.replace('_', '-')}", api_url)
        assert art is not None and float(art.data) == 100.0, task

    assert re.search(r"mergeflow run finished in .*: \d+ stage item\(s\) ran, 0 up to date", text)
    assert re.search(r"finetune\s*│\s*3\s*│", text), text[-4000:]
    m = re.search(r"best merge: (\S+) — mean normalized [\d.]+ \[[\d.]+, [\d.]+\] \(95 %\)", text)
    assert m, text[-4000:]
    assert f"dashboard: {ws / 'reports' / 'index.html'}" in text
    assert "Prefect flow run: http://127.0.0.1" in text and "MLflow run: run " in text

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mergeflow")
    (run,) = client.search_runs(
        [exp.experiment_id], "tags.`mergeflow.stage` = 'finetune@rotten_tomatoes'"
    )
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    val = client.get_metric_history(run.info.run_id, "val_accuracy_during_training")
    assert sorted(m.step for m in loss) == list(range(steps))
    assert sorted(m.step for m in val) == [10, 20, 30]
