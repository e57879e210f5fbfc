"""Two pipeline runs on one workspace: the second fails fast with a clear message, or waits.

- ``dvc repro`` twice at once (DVC 3.67): the repo lock is not held while a stage's command
  runs, but each running stage holds a read/write lock on its deps and outs, so the second
  ``dvc repro`` fails at once on the busy output, naming it and the holder's PID and command,
  with or without ``--wait-for-lock`` (which only waits for the repo lock). Writes never mix.
- Two flow processes: ``flows.pipeline.workspace_lock`` (an flock held for the whole run)
  refuses the second, naming the holder's pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import dvc
from tests.integration.conftest import BIN, ROOT, make_tiny_repo, read_jsonl

pytestmark = [pytest.mark.integration]


def _started(log: Path, name: str) -> bool:
    return name in [a["name"] for a in read_jsonl(log / "attempts.jsonl")]


def test_second_dvc_repro_fails_fast_naming_the_busy_output(tmp_path, monkeypatch):
    """Catches: a second ``dvc repro`` that waits for the first instead of failing. prepare@a
    stays running until this test releases it, so the second can only return (failing, naming
    the busy output) while the first still holds it — no timing window on a loaded machine."""
    ws = tmp_path / "ws"
    release = tmp_path / "release-prepare-a"
    ctl = make_tiny_repo(ws, {"default_sleep": 0.05, "hold": {"prepare@a": str(release)}})
    monkeypatch.setenv("TINY_CONTROL", str(ctl))
    log = Path(json.loads(ctl.read_text())["log"])
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180  # a generous bound on dvc's start-up
        while not _started(log, "prepare@a"):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        for flags in ([], ["--wait-for-lock"]):  # the flow passes --wait-for-lock
            # timeout: a guard against hanging (the holder waits up to 600 s), not the assertion
            second = subprocess.run(
                [str(BIN / "dvc"), *flags, "repro"],
                cwd=ws,
                capture_output=True,
                text=True,
                timeout=300,
            )
            msg = " ".join((second.stdout + second.stderr).split())
            assert second.returncode != 0, msg
            assert "failed to reproduce 'prepare@a'" in msg and "is busy" in msg, msg
            assert f"(PID {first.pid})" in msg, msg  # names the run holding it
            assert first.poll() is None  # returned while the first still ran: it did not wait
    finally:
        release.touch()
        first.wait(300)
    assert first.returncode == 0, first.stdout.read()
    assert "up to date" in dvc(ws, "repro").stdout
    names = [r["name"] for r in read_jsonl(log / "runs.jsonl")]
    assert sorted(names) == sorted(set(names)) and len(names) == 7  # every stage ran once
    assert json.loads(dvc(ws, "status", "--json").stdout) == {}


def test_second_flow_process_is_refused_naming_the_holder(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
        "from flows.pipeline import workspace_lock\n"
        f"with workspace_lock({str(ws)!r}):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from flows.pipeline import WorkspaceBusyError, workspace_lock

        with pytest.raises(WorkspaceBusyError) as err, workspace_lock(ws):
            pass
        assert f"pid {holder.pid}" in str(err.value) and "another flow run" in str(err.value)
    finally:
        holder.kill()
        holder.wait(30)
    with workspace_lock(ws):  # released when the holder died (even by SIGKILL)
        pass
    assert os.path.isfile(ws / ".dvc" / "tmp" / "mergeflow-flow.lock")
