"""Small per-user background services shared by stage processes (the tracking agent, the stage host).

A service is identified by a key (what it depends on: environment, code, interpreter); its Unix
socket lives in a private per-user directory. Whoever needs it connects, or launches it and
connects; the service binds under a lock file so concurrent launchers leave exactly one, takes
over a stale socket left by a dead one, and exits after an idle timeout. Nothing here imports
anything heavy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path


class DaemonSettingError(ValueError):
    """An idle-timeout environment variable is not a number of seconds."""


def idle_seconds(var: str, default: float) -> float:
    """Seconds an idle service stays up, from env ``var`` (``0`` turns the service off)."""
    raw = os.environ.get(var, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else default
    except ValueError:
        raise DaemonSettingError(
            f"{var}={raw!r} is not a number of seconds (0 turns this service off)"
        ) from None


def private_dir() -> Path | None:
    """This user's private directory for service sockets (``None`` if none is ours alone)."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()):
        if not base:
            continue
        d = Path(base) / f"mergeflow-{os.getuid()}"
        if len(str(d)) > 70:  # Unix socket paths are limited to 107 bytes
            continue
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            st = d.stat()
        except OSError:
            continue
        if st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return d
    return None


def env_key(
    parts: Iterable[str],
    files: Iterable[Path] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """A short hash of ``parts``, the contents of ``files`` and the ``env`` items (sorted)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    for f in files:
        with contextlib.suppress(OSError):
            h.update(Path(f).read_bytes())
    for k in sorted(env or {}):
        h.update(f"{k}={(env or {})[k]}".encode() + b"\0")
    return h.hexdigest()[:20]


def tree_signature(root: Path, pattern: str = "*.py") -> str:
    """Path, size and mtime of every file under ``root`` matching ``pattern`` (code identity)."""
    rows = []
    for p in sorted(Path(root).rglob(pattern)):
        with contextlib.suppress(OSError):
            st = p.stat()
            rows.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(rows)


def connect(path: str) -> socket.socket | None:
    """A connected Unix stream socket to ``path``, or ``None`` if nobody listens there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def launch_and_connect(
    path: str,
    argv: list[str],
    env: Mapping[str, str],
    timeout_s: float = 30.0,
    cwd: str | None = None,
) -> socket.socket | None:
    """Connect to the service at ``path``, launching ``argv`` first if nobody listens.

    The launched process (in ``cwd``, default the socket's directory) must detach (fork and
    exit) and bind ``path`` with :func:`bind_single`.
    Its output goes to ``<path without .sock>.log``; it holds no pipe of the caller's (DVC and
    Prefect wait for their commands' pipes to close).

    Returns:
        The connection, or ``None`` if the service could not be started or reached in time.
    """
    sock = connect(path)
    if sock is not None:
        return sock
    log_path = path[: -len(".sock")] + ".log" if path.endswith(".sock") else path + ".log"
    with contextlib.suppress(OSError):
        if os.path.getsize(log_path) > (1 << 20):
            os.truncate(log_path, 0)
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=cwd or os.path.dirname(path),
                env=dict(env),
                start_new_session=True,
            )
    except OSError:
        return None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            sock = connect(path)
            if sock is not None:
                return sock
            if proc.poll() not in (None, 0):
                return None  # it could not start: its error is in the log
            time.sleep(0.02)
        return None
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # the launcher forks the service off and exits at once


@contextlib.contextmanager
def locked(path: str):
    """An exclusive ``flock`` on ``<path>.lock`` for the duration of the block."""
    import fcntl

    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bind_single(path: str, backlog: int = 64) -> socket.socket | None:
    """Bind and listen on ``path`` unless a live service already does (then ``None``).

    Under :func:`locked`, so of several services started at once exactly one binds; a socket
    file nobody listens on (its service was killed) is replaced.
    """
    with locked(path):
        probe = connect(path)
        if probe is not None:
            probe.close()
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(backlog)
        return s


def retire(path: str) -> None:
    """Remove the service's socket path (under the lock): new clients then start a new one."""
    with locked(path), contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def drain(listener: socket.socket, handle) -> None:
    """After :func:`retire`: hand each connection already queued on ``listener`` to ``handle``.

    Clients that connected before the socket path was removed are served, not dropped.
    """
    listener.setblocking(False)
    while True:
        try:
            conn, addr = listener.accept()
        except OSError:
            break
        conn.setblocking(True)
        handle(conn, addr)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def detach() -> None:
    """Fork; the parent (the launcher the client waits for) exits, the child carries on."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
