"""The warm stage host: stages run in its forks exactly as in their own process (output, exit
status, signals), a killed entry point kills its stage, and the host is shared and exits idle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mergeflow import stagehost
from tests.helpers import live_processes, wait_for

STAGE = '''
"""A probe stage: writes what its process looks like, then behaves as told by --mode."""
import json, os, sys, time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    out: Path
    mode: str


def run(cfg, paths):
    info = {
        "pid": os.getpid(),
        "preloaded": "transformers.models.bert.modeling_bert" in sys.modules,
        "cwd": os.getcwd(),
        "probe_env": os.environ.get("PROBE_ENV"),
        "argv": sys.argv,
        "seed": cfg.seed,
    }
    paths.out.write_text(json.dumps(info))
    print("stdout line", flush=True)
    print("stderr line", file=sys.stderr, flush=True)
    if paths.mode == "bad":
        raise ValueError("bad value for probe")
    if paths.mode == "crash":
        raise RuntimeError("probe crashed")
    if paths.mode == "exit5":
        sys.exit(5)
    if paths.mode == "sigkill":
        os.kill(os.getpid(), 9)
    if paths.mode == "sleep":
        time.sleep(120)
'''

ENTRY = 'from mergeflow.stage import main\nmain("probe_stage")\n'


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A workspace with the probe stage on PYTHONPATH and a shared host (short idle)."""
    ws = tmp_path_factory.mktemp("hostws")
    (ws / "probe_stage.py").write_text(textwrap.dedent(STAGE))
    (ws / "entry.py").write_text(ENTRY)
    repo = Path(__file__).resolve().parents[2]
    (ws / "params.yaml").write_text((repo / "params.yaml").read_text())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ws), str(repo / "src")]),
        stagehost.IDLE_ENV: "4",
        "MERGEFLOW_TRACKING": "off",
    }
    env.pop("PROBE_ENV", None)
    return ws, env


def _run(ws, env, mode, out="out.json", **kw):
    return subprocess.run(
        [sys.executable, "entry.py", "--out", out, "--mode", mode],
        cwd=ws, env=env, capture_output=True, text=True, timeout=180, **kw,
    )


def _hosts(sock: str) -> list[int]:
    return live_processes("mergeflow.stagehost", sock)


def _sock(env) -> str:
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return stagehost.host_path()
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_stages_run_in_the_warm_host_as_in_their_own_process(probe):
    import json

    ws, env = probe
    env = {**env, "PROBE_ENV": "per-stage value"}
    first = _run(ws, env, "ok")
    assert first.returncode == 0, first.stderr
    info = json.loads((ws / "out.json").read_text())
    assert info["preloaded"]  # forked from the host: transformers imported before the stage
    assert info["cwd"] == str(ws) and info["probe_env"] == "per-stage value"
    assert info["argv"][1:] == ["--out", "out.json", "--mode", "ok"] and info["seed"] == 0
    assert first.stdout.strip() == "stdout line" and "stderr line" in first.stderr
    sock = _sock(env)
    hosts = _hosts(sock)
    assert len(hosts) == 1
    again = _run(ws, env, "ok", out="out2.json")
    assert again.returncode == 0 and _hosts(sock) == hosts  # the same host served both
    assert json.loads((ws / "out2.json").read_text())["pid"] != info["pid"]

    bad = _run(ws, env, "bad")  # bad input: one error line, status 2
    assert bad.returncode == 2 and "error: bad value for probe" in bad.stderr
    assert "Traceback" not in bad.stderr
    crash = _run(ws, env, "crash")  # a bug: the traceback, status 1
    assert crash.returncode == 1 and "RuntimeError: probe crashed" in crash.stderr
    assert _run(ws, env, "exit5").returncode == 5
    assert _run(ws, env, "sigkill").returncode == -signal.SIGKILL

    off = _run(ws, {**env, stagehost.IDLE_ENV: "0"}, "ok", out="off.json")
    assert off.returncode == 0
    assert not json.loads((ws / "off.json").read_text())["preloaded"]  # its own process

    assert wait_for(lambda: not _hosts(sock)), "the idle host did not exit"
    assert not os.path.exists(sock)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_entry_point_takes_its_stage_down(probe, how):
    """DVC/Prefect timeouts kill the command: the stage in the host must not live on. SIGTERM is
    forwarded (the entry point then dies of it); SIGKILL is noticed by the supervisor."""
    import json

    ws, env = probe
    out = ws / f"sleep-{how}.json"
    proc = subprocess.Popen(
        [sys.executable, "entry.py", "--out", out.name, "--mode", "sleep"],
        cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    assert wait_for(lambda: out.exists() and out.read_text()), "the stage did not start"
    stage_pid = json.loads(out.read_text())["pid"]
    assert stage_pid != proc.pid
    proc.send_signal(getattr(signal, how))
    assert proc.wait(30) == -getattr(signal, how)

    def gone() -> bool:
        try:
            state = Path(f"/proc/{stage_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"

    assert wait_for(gone, 20), "the stage outlived its entry point"


def test_a_bad_host_setting_is_a_clear_error(probe):
    ws, env = probe
    bad = _run(ws, {**env, stagehost.IDLE_ENV: "later"}, "ok")
    assert bad.returncode == 2 and f"{stagehost.IDLE_ENV}='later'" in bad.stderr
