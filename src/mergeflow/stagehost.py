"""Stage host: a warm process with torch and transformers imported that forks one child per stage.

Importing torch and transformers costs ~9 s of CPU per stage process on the 2-core reference
machine (transformers 5 pulls in torch._dynamo, torch.distributed.tensor, scipy…), and a bare
``dvc repro`` of the default pipeline starts 15 such processes one after the other. The first
stage launches the host (``python -m mergeflow.stagehost``); every stage entry point
(``python stages/<stage>.py``) then hands its argv, cwd, environment and stdin/stdout/stderr to
it and the host forks a child that runs the stage with everything already imported, exactly as
the process itself would (same fds, so DVC and Prefect see the same output and exit status).

Per stage, the host forks a *supervisor* (single-threaded) that forks the stage and waits for it:
it reports the stage's exit status (or the signal that killed it) back to the entry point, and
kills the stage (SIGTERM, then SIGKILL) if the entry point dies — a DVC or Prefect timeout that
kills the command kills the stage. The entry point forwards SIGINT/SIGTERM/SIGHUP to the stage.

A host serves one key: interpreter, the full environment (minus per-stage variables), mergeflow's
source files (size and mtime: an edit starts a new host) and the installed torch/transformers. It
exits after ``MERGEFLOW_STAGE_HOST_IDLE`` seconds without stages (default 120; ``0`` runs every
stage in its own process, as does any failure to reach the host before the stage starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from mergeflow import daemon

IDLE_ENV = "MERGEFLOW_STAGE_HOST_IDLE"
_IDLE_DEFAULT_S = 120.0
# set per stage by DVC, the shell or pytest; nothing imported at start-up reads them
_PER_STAGE_ENV = ("DVC_STAGE", "PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST", IDLE_ENV)
# imported by the host before it serves: what every torch stage needs
_PRELOAD = (
    "numpy",
    "torch",
    "safetensors.torch",
    "tqdm.auto",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "mergeflow.stage",
    "mergeflow.pipeline.finetune",
    "mergeflow.pipeline.task_vectors",
    "mergeflow.pipeline.masks",
    "mergeflow.pipeline.coefficients",
    "mergeflow.pipeline.compress",
    "mergeflow.pipeline.evaluate",
    "mergeflow.pipeline.audit",
    "mergeflow.pipeline.base",
)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def idle_s() -> float:
    """Seconds an idle host stays up (``MERGEFLOW_STAGE_HOST_IDLE``; 0 = no host)."""
    return daemon.idle_seconds(IDLE_ENV, _IDLE_DEFAULT_S)


def host_key(env: dict[str, str] | None = None) -> str:
    """Which host may run this process's stage: everything its start-up imports depend on."""
    import importlib.util

    env = dict(os.environ if env is None else env)
    pkg = Path(__file__).resolve().parent
    parts = [sys.executable, daemon.tree_signature(pkg)]
    for name in ("torch", "transformers", "safetensors", "numpy"):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                st = os.stat(spec.origin)
                parts.append(f"{name}:{spec.origin}:{st.st_mtime_ns}")
    return daemon.env_key(parts, (), {k: v for k, v in env.items() if k not in _PER_STAGE_ENV})


def host_path() -> str | None:
    """The host's socket path for this process's key (``None``: no private dir)."""
    where = daemon.private_dir()
    return None if where is None else str(where / f"host-{host_key()}.sock")


def _send(conn: socket.socket, msg: dict) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\n")


def _lines(conn: socket.socket):
    """JSON messages from ``conn``, one per line, until EOF."""
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)
        try:
            chunk = conn.recv(65536)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk


def delegate(module: str) -> int | None:
    """Run stage ``module`` (with this process's argv) in the stage host; ``None`` if not.

    Returns the stage's exit status; a stage killed by a signal kills this process with the
    same signal. ``None`` (nothing ran) when the host is off or cannot be reached: the caller
    runs the stage itself.
    """
    try:
        idle = idle_s()
    except daemon.DaemonSettingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = host_path() if idle > 0 else None
    if path is None:
        return None
    argv = [sys.executable, "-m", "mergeflow.stagehost", path, str(idle)]
    conn = daemon.launch_and_connect(path, argv, os.environ, timeout_s=60.0)
    if conn is None:
        return None
    with conn:
        request = {
            "module": module,
            "argv": sys.argv,
            "path0": sys.path[0],
            "cwd": os.getcwd(),
            "env": dict(os.environ),
        }
        try:
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        except OSError:
            return None
        replies = _lines(conn)
        started = next(replies, None)
        if not started or "pid" not in started:
            return None  # the host went away before forking: nothing ran
        pid = started["pid"]

        def forward(sig: int, _frame) -> None:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

        for sig in _FORWARDED:
            signal.signal(sig, forward)
        done = next(replies, None)
    if done is None:
        print(f"error: lost the stage host while stage {module} ran (pid {pid})", file=sys.stderr)
        return 1
    if done.get("signal"):
        sig = done["signal"]
        with contextlib.suppress(OSError, ValueError):  # SIGKILL/SIGSTOP have no handler
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return int(done["code"])


def _stage(msg: dict, fds: list[int]) -> None:
    """In the forked stage process: become the entry point's process, run the stage, exit."""
    import atexit
    import random
    import threading
    import traceback

    os.setpgid(0, 0)  # its own group: the supervisor can kill it with its subprocesses
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    enc = {"encoding": "utf-8", "errors": "backslashreplace"}
    sys.stdin = sys.__stdin__ = open(0, closefd=False, encoding="utf-8")  # noqa: SIM115
    line = {"buffering": 1}  # line-buffered, as the interpreter sets up a tty / stderr
    out = line if os.isatty(1) else {}
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False, **out, **enc)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", closefd=False, **line, **enc)  # noqa: SIM115
    os.chdir(msg["cwd"])
    os.environ.clear()
    os.environ.update(msg["env"])
    sys.argv = list(msg["argv"])
    sys.path[0] = msg["path0"]
    random.seed()
    with contextlib.suppress(Exception):
        import numpy as np

        np.random.seed()
    code = 1
    try:
        from mergeflow.stage import main

        main(msg["module"], sys.argv[1:])
        code = 0
    except SystemExit as exc:  # what the interpreter does with it
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - printed as an uncaught exception would be
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            threading._shutdown()  # join non-daemon threads, as interpreter exit does
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os._exit(code & 0xFF)


def _supervise(conn: socket.socket, msg: dict, fds: list[int]) -> None:
    """In the supervisor: fork the stage, report its pid and exit status; kill it if orphaned."""
    import select

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the host ignores it; we wait for the stage
    pid = os.fork()
    if pid == 0:
        try:
            conn.close()
            _stage(msg, fds)
        except BaseException:  # noqa: BLE001 - before the stage's own stderr was set up
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid})
    except OSError:
        pass
    orphaned_at = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if orphaned_at is None:
            ready, _, _ = select.select([conn], [], [], 0.2)
            if ready:
                try:
                    gone = not conn.recv(1024)
                except OSError:
                    gone = True
                if gone:  # the entry point died (killed by DVC, Prefect, the user)
                    orphaned_at = time.monotonic()
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGTERM)
        else:
            time.sleep(0.1)
            if time.monotonic() - orphaned_at > 5:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
    reply = (
        {"signal": os.WTERMSIG(status)}
        if os.WIFSIGNALED(status)
        else {"code": os.WEXITSTATUS(status)}
    )
    with contextlib.suppress(OSError):
        _send(conn, reply)
    os._exit(0)


def _serve_one(listener: socket.socket, conn: socket.socket) -> int | None:
    """Read one request and fork its supervisor; the supervisor's pid (``None``: bad request)."""
    conn.settimeout(10)
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                raise OSError("request cut short")
            data += more
        msg = json.loads(data)
        if len(fds) != 3:
            raise OSError(f"expected 3 file descriptors, got {len(fds)}")
    except (OSError, ValueError) as err:
        print(f"stage host: bad request: {err}", file=sys.stderr, flush=True)
        conn.close()
        return None
    conn.settimeout(None)
    pid = os.fork()
    if pid == 0:
        listener.close()
        try:
            _supervise(conn, msg, fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    conn.close()
    return pid


def _host(path: str, idle: float) -> None:
    """The host: import what stages need, then fork a supervisor per request until idle."""
    import importlib

    from mergeflow.models.hf import offline_env
    from mergeflow.runtime import tune_malloc

    daemon.detach()
    listener = daemon.bind_single(path)
    if listener is None:
        return  # another host serves this key
    tune_malloc()  # inherited by every stage
    offline_env()  # as every stage sets it before importing transformers
    for name in _PRELOAD:  # requests queue on the socket meanwhile
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - the stage imports it itself (and reports)
            print(f"stage host: preloading {name} failed: {err}", file=sys.stderr, flush=True)
    import threading

    # a Python thread could hold a lock (logging, import) at fork time: then let every stage run
    # itself. (torch's native helper threads are re-created in forked children by its own
    # fork handlers, as for DataLoader workers.)
    threads = threading.active_count()
    if threads > 1:
        print(f"stage host: {threads} Python threads after preloading; not serving", file=sys.stderr)
        daemon.retire(path)
        listener.close()
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    listener.settimeout(1.0)
    live: list[int] = []
    last = time.monotonic()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            live = [p for p in live if daemon.pid_alive(p)]
            if live:
                last = time.monotonic()
            elif time.monotonic() - last >= idle:
                break
            continue
        pid = _serve_one(listener, conn)
        if pid is not None:
            live.append(pid)
        last = time.monotonic()
    daemon.retire(path)  # new stages start a new host from now on
    daemon.drain(listener, lambda conn, _addr: _serve_one(listener, conn))
    listener.close()


if __name__ == "__main__":
    _host(sys.argv[1], float(sys.argv[2]))
