"""MLflow lineage: one run per stage item with params, input/output hashes, git commit and metrics.

This is the only module that imports mlflow. The tracking URI comes from ``MLFLOW_TRACKING_URI``;
unset, runs go to a local SQLite store inside the repo (``mlflow.db``, ignored by git) with
artifacts under ``mlruns/``.

Lineage under Prefect: the flow opens one parent run (:func:`flow_run`) and hands its id to the stage
processes through ``MERGEFLOW_PARENT_RUN_ID`` (plus ``MERGEFLOW_FLOW_RUN_ID``/``_URL``), so every
stage item's run is nested under it. An unreachable tracking server is an explicit error
(:class:`TrackingUnavailableError`) before any stage runs, never a silent gap in the lineage;
``MERGEFLOW_TRACKING=off`` runs the pipeline deliberately without lineage. Only params from
``params.yaml``, md5s, ids and URLs are logged — never the environment (credentials live there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mergeflow.io import tree_md5

EXPERIMENT = os.environ.get("MERGEFLOW_EXPERIMENT", "mergeflow")


def tracking_uri(base: str | Path | None = None) -> str:
    """The MLflow tracking URI in force (env, else ``sqlite:///<base or cwd>/mlflow.db``)."""
    where = Path(base).resolve() if base is not None else Path.cwd()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{where / 'mlflow.db'}"


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def tracking_enabled() -> bool:
    """False when ``MERGEFLOW_TRACKING=off`` (run without lineage, deliberately)."""
    return os.environ.get("MERGEFLOW_TRACKING", "on").lower() not in ("off", "0", "false", "no")


def check_server(uri: str | None = None, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` naming the URI if an HTTP tracking server is down.

    Local stores (sqlite, file) need no check. Bounded: one ``GET /health`` with ``timeout_s``.
    """
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not tracking_enabled() or not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            why = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        why = str(getattr(err, "reason", err))
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} is unreachable ({why}). Start it, point MLFLOW_TRACKING_URI "
        "at a running server, or set MERGEFLOW_TRACKING=off to run without lineage."
    )


def _quiet() -> None:
    """Before importing MLflow: no telemetry (no network here), warnings and errors only."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _mlflow(uri: str | None = None):
    _quiet()
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(uri or tracking_uri())
    finally:  # mlflow also exports the URI to os.environ; stage subprocesses must not inherit it
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def git_commit(cwd: str | Path = ".") -> str:
    """The checked-out git commit, with ``-dirty`` if the work tree has changes; ``unknown`` else."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (``finetune.lora.r``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Recorder:
    """Opens and fills stage runs through the MLflow client.

    It lives in the stage's tracking sidecar (:func:`sidecar`) or, when there is none (library
    use, tests), in the calling process. Every method takes and returns plain JSON data.
    """

    def __init__(self, mlflow_module=None):
        self._mlflow = mlflow_module
        self.run = None

    @property
    def mlflow(self):
        if self._mlflow is None:
            self._mlflow = _mlflow()
        return self._mlflow

    def start(self, stage: str, params: dict, inputs: dict, tags: dict, cwd: str = ".") -> None:
        mlflow = self.mlflow
        all_tags = {
            "mergeflow.stage": stage,
            "mlflow.source.git.commit": git_commit(cwd),
            **{f"input.{k}.md5": tree_md5(p) for k, p in inputs.items()},
            **tags,
        }
        self.run = mlflow.start_run(run_name=stage, tags=all_tags)
        try:
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
        except Exception:
            self.end("FAILED")
            raise

    def run_id(self) -> str:
        return self.run.info.run_id if self.run is not None else ""

    def metrics(self, values: dict, step: int | None = None) -> None:
        self.mlflow.log_metrics(values, step=step)

    def outputs(self, paths: dict) -> None:
        self.mlflow.set_tags({f"output.{k}.md5": tree_md5(p) for k, p in paths.items()})

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(path, artifact_path)

    def dataset(self, name: str, digest: str, source: str, context: str) -> None:
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(source)
        ds = MetaDataset(source=src, name=name, digest=digest[:36])
        self.mlflow.log_input(ds, context=context)

    def end(self, status: str) -> None:
        if self.run is not None:
            self.run = None
            self.mlflow.end_run(status)


class TrackingError(RuntimeError):
    """Logging a stage's lineage into MLflow failed (the stage's outputs are already written)."""


class _InProcess:
    """Sends a stage run's calls straight to a :class:`_Recorder` in this process."""

    def __init__(self) -> None:
        self._rec = _Recorder()

    def send(self, op: str, **kw) -> None:
        getattr(self._rec, op)(**kw)

    def ask(self, op: str, **kw):
        return getattr(self._rec, op)(**kw)


class _StreamSink:
    """Calls as JSON lines to a serving loop (:func:`_serve_stream`); replies read back as lines."""

    def __init__(self, writer, reader) -> None:
        self.started = False
        self._w, self._r = writer, reader

    def _dead(self) -> TrackingError:
        return TrackingError(f"the MLflow tracking service went away (tracking URI {tracking_uri()})")

    def send(self, op: str, **kw) -> None:
        self.started = self.started or op == "start"
        try:
            self._w.write(json.dumps({"op": op, **kw}) + "\n")
            self._w.flush()
        except (BrokenPipeError, OSError):
            raise self._dead() from None

    def ask(self, op: str, **kw):
        self.send(op, **kw)
        line = self._r.readline()
        if not line:
            raise self._dead()
        reply = json.loads(line)
        if "error" in reply:
            raise TrackingError(f"MLflow logging failed ({tracking_uri()}): {reply['error']}")
        return reply["value"]


class _Sidecar(_StreamSink):
    """The stage's own tracking process: ``python -m mergeflow.tracking`` fed on stdin.

    Importing MLflow and opening its store take ~6-9 s of one core per process on this project's
    2-core reference machine. The stage entry point starts the sidecar before importing torch, so
    that cost runs on the otherwise idle second core while the stage imports its own libraries,
    and metrics never wait for the store (artifacts and output hashes do: see :data:`_ANSWERED`).
    Errors surface at the end of the run (or at ``run_id``) as :class:`TrackingError`; a stage
    that dies leaves its run marked FAILED.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mergeflow.tracking", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        super().__init__(self.proc.stdin, self.proc.stdout)

    def _dead(self) -> TrackingError:
        code = self.proc.wait()
        return TrackingError(
            f"the MLflow tracking process exited with status {code} (its error is above); "
            f"tracking URI {tracking_uri()}. Fix the store or set MERGEFLOW_TRACKING=off."
        )

    def close(self) -> None:
        """Let a sidecar that logged runs finish; one that never started a run is stopped."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60 if self.started else 0.1)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _SocketSink(_StreamSink):
    """A connection to a tracking service: the flow's (:func:`serve`) or the agent (:func:`_agent`)."""

    def __init__(self, where) -> None:
        """Connect to socket path ``where`` (or take an already connected socket)."""
        import socket

        from mergeflow.daemon import connect

        sock = where if isinstance(where, socket.socket) else connect(where)
        if sock is None:
            raise OSError(f"nobody listens on tracking socket {where}")
        self.sock = sock
        super().__init__(self.sock.makefile("w", encoding="utf-8"), self.sock.makefile("r"))

    def close(self) -> None:
        """Hang up; the service ends a run this process left open as FAILED."""
        with contextlib.suppress(OSError):
            self._w.close()
            self._r.close()
            self.sock.close()


_SIDECAR: _StreamSink | None = None
SOCKET_ENV = "MERGEFLOW_TRACKING_SOCKET"


@contextlib.contextmanager
def sidecar() -> Iterator[None]:
    """Route this process's :func:`stage_run` s to a tracking service outside it.

    Under a flow (``MERGEFLOW_TRACKING_SOCKET`` set by :meth:`FlowRun.env`), the flow process's
    service, which has MLflow loaded already; otherwise a :class:`_Sidecar` started now. Start it
    first thing in a stage process (``mergeflow.stage.main`` does), before heavy imports. Does
    nothing when lineage is off.
    """
    global _SIDECAR
    if not tracking_enabled() or _SIDECAR is not None:
        yield
        return
    side: _StreamSink | None = None
    if os.environ.get(SOCKET_ENV):
        with contextlib.suppress(OSError):
            side = _SocketSink(os.environ[SOCKET_ENV])
    _SIDECAR = side or _agent_sink() or _Sidecar()
    try:
        yield
    finally:
        side, _SIDECAR = _SIDECAR, None
        side.close()


# calls the stage waits for: they read files as they are now (an artifact may live in a temp dir
# that is renamed right after), or return a value / the run's error
_ANSWERED = ("run_id", "end", "artifact", "outputs")


def _serve_stream(lines, write, rec: _Recorder) -> None:
    """Serve one stage's calls: one JSON call per line; replies (:data:`_ANSWERED`) via ``write``.

    The first failing call's error is kept, later calls of that run are skipped, and the error is
    the reply to ``end``. End of input with a run still open (the stage died) ends it FAILED.
    """
    error = None
    for line in lines:
        msg = json.loads(line)
        op = msg.pop("op")
        if op not in _ANSWERED:
            if error is None:
                try:
                    getattr(rec, op)(**msg)
                except Exception as err:  # noqa: BLE001 - reported at the run's end
                    error = f"{op}: {type(err).__name__}: {err}"
            continue
        value = None
        if error is None:
            try:
                value = getattr(rec, op)(**msg)
            except Exception as err:  # noqa: BLE001
                error = f"{op}: {type(err).__name__}: {err}"
        write(json.dumps({"error": error} if error else {"value": value}) + "\n")
        if op == "end":
            error = None
    if rec.run is not None:
        rec.end("FAILED")


def _server(where, recorder, on_open=None, on_close=None):
    """A threading Unix-socket server: one thread and one :class:`_Recorder` per connection.

    Args:
        where: Socket path (bound now), or a bound and listening socket.
        recorder: Makes the :class:`_Recorder` of a new connection.
        on_open: Called when a connection starts being served.
        on_close: Called when it has been served (its run ended).
    """
    import socketserver
    import threading

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            def write(text: str) -> None:
                self.wfile.write(text.encode())
                self.wfile.flush()

            if on_open:
                on_open()
            try:
                lines = (raw.decode() for raw in self.rfile)
                _serve_stream(lines, write, recorder())
            finally:
                if on_close:
                    on_close()

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        block_on_close = False  # joined by the owner with a deadline: an orphan must not hang it
        request_queue_size = 64

        def __init__(self, *a, **kw) -> None:
            self.handlers: list[threading.Thread] = []
            super().__init__(*a, **kw)

        def process_request(self, request, client_address) -> None:
            t = threading.Thread(
                target=self.process_request_thread, args=(request, client_address), daemon=True
            )
            self.handlers.append(t)
            t.start()

    if isinstance(where, str):
        return Server(where, Handler)
    server = Server(where.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = where
    return server


@contextlib.contextmanager
def serve(mlflow_module, close_timeout_s: float = 30.0) -> Iterator[str]:
    """A tracking service in this process (a flow's): stage processes log through its socket.

    Each connection gets a thread and its own :class:`_Recorder` on ``mlflow_module`` (MLflow's
    active run is thread-local), so stage items running side by side log side by side.

    Args:
        mlflow_module: The configured ``mlflow`` module (tracking URI and experiment set).
        close_timeout_s: At exit, wait this long for open connections to end their runs.

    Yields:
        The Unix socket path (export it as ``MERGEFLOW_TRACKING_SOCKET``).
    """
    import shutil
    import tempfile
    import threading
    import time

    where = tempfile.mkdtemp(prefix="mftrk-")
    path = os.path.join(where, "s")
    server = _server(path, lambda: _Recorder(mlflow_module))
    thread = threading.Thread(target=server.serve_forever, name="mergeflow-tracking", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + close_timeout_s
        for t in server.handlers:  # let each connection end its run (FAILED if left open)
            t.join(max(0.0, deadline - time.monotonic()))
        shutil.rmtree(where, ignore_errors=True)


# --- the tracking agent: one MLflow process shared by the stages of a bare `dvc repro` ----------

AGENT_IDLE_ENV = "MERGEFLOW_TRACKING_AGENT_IDLE"
_AGENT_IDLE_DEFAULT_S = 120.0
# what the agent's logging depends on besides the tracking URI: MLflow/boto/proxy/CA settings and
# mergeflow's own (the per-stage ones are read by the stage process, not the agent)
_AGENT_ENV_PREFIXES = ("MLFLOW_", "AWS_", "MERGEFLOW_", "AZURE_", "GOOGLE_")
_AGENT_ENV_NAMES = (
    "HOME", "PYTHONPATH", "VIRTUAL_ENV", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
    "https_proxy", "no_proxy", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
)
_AGENT_ENV_PER_STAGE = (
    SOCKET_ENV, AGENT_IDLE_ENV, "MERGEFLOW_PARENT_RUN_ID", "MERGEFLOW_FLOW_RUN_ID",
    "MERGEFLOW_FLOW_RUN_URL", "MERGEFLOW_STAGE_HOST_IDLE",
)


def agent_idle_s() -> float:
    """Seconds an idle tracking agent stays up (``MERGEFLOW_TRACKING_AGENT_IDLE``; 0 = no agent)."""
    from mergeflow.daemon import DaemonSettingError, idle_seconds

    try:
        return idle_seconds(AGENT_IDLE_ENV, _AGENT_IDLE_DEFAULT_S)
    except DaemonSettingError as err:
        raise TrackingError(str(err)) from None


def agent_key() -> str:
    """Identity of the agent this process may share: tracking URI, logging env, code, Python."""
    from mergeflow.daemon import env_key

    here = Path(__file__).resolve()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _AGENT_ENV_PER_STAGE
        and (k.startswith(_AGENT_ENV_PREFIXES) or k in _AGENT_ENV_NAMES)
    }
    # the code the agent runs: this module and the hashing of inputs/outputs
    code = (here, here.parent / "io" / "hashing.py", here.parent / "daemon.py")
    # the cwd too: MLflow puts a new SQLite store's artifact root under the creator's ./mlruns
    return env_key((tracking_uri(), os.getcwd(), sys.executable, str(here)), code, env)


def agent_path() -> str | None:
    """The agent's socket path for this process's key (``None``: no private dir)."""
    from mergeflow.daemon import private_dir

    where = private_dir()
    return None if where is None else str(where / f"agent-{agent_key()}.sock")


def _agent_sink() -> _SocketSink | None:
    """A connection to the tracking agent for this process's key, starting the agent if needed.

    ``None`` when the agent is off (``MERGEFLOW_TRACKING_AGENT_IDLE=0``) or cannot be reached:
    the caller then starts a per-stage :class:`_Sidecar`.
    """
    from mergeflow.daemon import launch_and_connect

    idle = agent_idle_s()
    path = agent_path() if idle > 0 else None
    if path is None:
        return None
    argv = [sys.executable, "-m", "mergeflow.tracking", "--agent", path, "--idle", str(idle)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    sock = launch_and_connect(path, argv, env, cwd=os.getcwd())
    return None if sock is None else _SocketSink(sock)


def _agent(path: str, idle_s: float) -> None:
    """The tracking agent: serve stages on ``path`` until idle for ``idle_s`` seconds, then exit.

    One agent per :func:`agent_key` (:func:`mergeflow.daemon.bind_single`: concurrent starters
    leave exactly one). It imports MLflow once and serves every stage of a ``dvc repro`` (one
    thread and one run per connection), instead of one MLflow import per stage (~12 s of CPU on
    the 2-core reference machine). It leaves no half-served client: the socket is unlinked first
    (new stages then start a new agent), then connections already queued are served.
    """
    import threading
    import time

    from mergeflow.daemon import bind_single, detach, drain, retire

    detach()
    listener = bind_single(path)
    if listener is None:
        return  # another agent serves this key
    ready = threading.Event()
    mod: list = [None]
    guard = threading.Lock()
    state = {"active": 0, "last": time.monotonic()}

    def recorder() -> _Recorder:
        ready.wait()
        return _Recorder(mod[0])

    def opened() -> None:
        with guard:
            state["active"] += 1

    def closed() -> None:
        with guard:
            state["active"] -= 1
            state["last"] = time.monotonic()

    server = _server(listener, recorder, opened, closed)
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True)
    thread.start()
    with contextlib.suppress(Exception):  # a failure shows in each client's reply instead
        mod[0] = _mlflow()
    ready.set()
    while True:
        time.sleep(min(1.0, idle_s / 4))
        with guard:
            if state["active"] == 0 and time.monotonic() - state["last"] >= idle_s:
                break
    retire(path)  # from now on new stages start a new agent
    server.shutdown()
    drain(listener, server.process_request)
    for t in list(server.handlers):
        t.join()
    server.server_close()


def _serve() -> None:
    """The sidecar process: serve the stage on stdin/stdout (replies on the original stdout)."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # MLflow's own prints must not hit replies
    _quiet()
    # import MLflow and its store while the stage imports its libraries (no store opened yet);
    # an import error surfaces at the stage's first reply through _Recorder.mlflow
    with contextlib.suppress(Exception):
        import mlflow  # noqa: F401

        if tracking_uri().startswith("sqlite:"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    _serve_stream(sys.stdin, out.write, _Recorder())


class StageRun:
    """Handle for logging into the active stage run."""

    def __init__(self, sink):
        self._sink = sink

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self._sink.ask("run_id")

    def metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested mappings are flattened)."""
        flat = {k: float(v) for k, v in flatten(values).items() if isinstance(v, int | float)}
        if flat:
            self._sink.send("metrics", values=flat, step=step)

    def outputs(self, paths: Mapping[str, str | Path]) -> None:
        """Record the md5 of each output artifact as a tag ``output.<name>.md5`` (hashed now)."""
        self._sink.ask("outputs", paths={k: str(Path(p).resolve()) for k, p in paths.items()})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a (small) file to the run's artifacts (copied before this returns)."""
        self._sink.ask("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Log a dataset input (name, content digest, where it came from, which split)."""
        src = str(Path(source).resolve())
        self._sink.send("dataset", name=name, digest=digest, source=src, context=context)


class _NoRun:
    """Stands in for :class:`StageRun` when lineage is off (``MERGEFLOW_TRACKING=off``)."""

    run_id = ""

    def metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Do nothing."""

    def outputs(self, paths: Mapping[str, str | Path]) -> None:
        """Do nothing."""

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Do nothing."""

    def dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Do nothing."""


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | Path] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage item.

    Logs the stage's params (flattened), the md5 of every input artifact (``input.<name>.md5``),
    the git commit, the DVC stage name and, when Prefect runs the stage, its flow-run id. Inside a
    :func:`sidecar` the calls go to the sidecar process; otherwise to MLflow in this process.

    Args:
        stage: DVC stage item name, e.g. ``finetune@rotten_tomatoes``.
        params: The params this stage depends on.
        inputs: Input artifacts (files or dirs) by name.
        tags: Extra tags.

    Yields:
        A :class:`StageRun` to log metrics and outputs into.

    Raises:
        TrackingUnavailableError: an HTTP tracking server does not answer (checked first).
        TrackingError: logging failed; raised when the run ends, after the stage's work.
    """
    if not tracking_enabled():
        yield _NoRun()
        return
    check_server(timeout_s=10)
    all_tags = dict(tags or {})
    parent = os.environ.get("MERGEFLOW_PARENT_RUN_ID")
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    flow = os.environ.get("PREFECT__FLOW_RUN_ID") or os.environ.get("MERGEFLOW_FLOW_RUN_ID")
    if flow:
        all_tags["prefect.flow_run_id"] = flow
    if os.environ.get("MERGEFLOW_FLOW_RUN_URL"):
        all_tags["prefect.flow_run_url"] = os.environ["MERGEFLOW_FLOW_RUN_URL"]
    sink = _SIDECAR if _SIDECAR is not None else _InProcess()
    sink.send(
        "start",
        stage=stage,
        params={k: str(v)[:6000] for k, v in flatten(params).items()},
        inputs={k: str(Path(p).resolve()) for k, p in (inputs or {}).items()},
        tags=all_tags,
        cwd=str(Path.cwd()),
    )
    try:
        yield StageRun(sink)
    except BaseException:
        with contextlib.suppress(Exception):
            sink.ask("end", status="FAILED")
        raise
    sink.ask("end", status="FINISHED")


def _lock_stages(lock_path: Path) -> dict[str, dict]:
    """``dvc.lock``'s stages, with ``foreach`` items under their ``stage@item`` names."""
    import yaml

    if not lock_path.is_file():
        return {}
    return (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) or {}


def dvc_md5_tags(entry: Mapping[str, Any]) -> dict[str, str]:
    """Tags ``dvc.dep.<path>.md5`` / ``dvc.out.<path>.md5`` from one ``dvc.lock`` stage entry."""
    tags = {}
    for kind in ("deps", "outs"):
        for d in entry.get(kind, []) or []:
            if d.get("md5"):
                tags[f"dvc.{kind[:-1]}.{d['path']}.md5"[:250]] = str(d["md5"])
    return tags


class FlowRun:
    """The parent MLflow run of one Prefect flow run (or a stand-in when lineage is off)."""

    def __init__(
        self, mlflow_module, run_id: str, uri: str, prefect_run_id: str, url: str, socket: str = ""
    ):
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.uri = uri
        self.socket = socket
        self._prefect = (prefect_run_id, url)

    def env(self) -> dict[str, str]:
        """Environment for the stage processes: nest their runs under this one."""
        env = {"MLFLOW_TRACKING_URI": self.uri} if self.run_id else {}
        if self.run_id:
            env["MERGEFLOW_PARENT_RUN_ID"] = self.run_id
        if self.socket:
            env[SOCKET_ENV] = self.socket
        if self._prefect[0]:
            env["MERGEFLOW_FLOW_RUN_ID"] = self._prefect[0]
        if self._prefect[1]:
            env["MERGEFLOW_FLOW_RUN_URL"] = self._prefect[1]
        return env

    def record_workspace(
        self, root: str | Path, files: list[str] = (), commit: str | None = None
    ) -> None:
        """Keep ``dvc.lock``, params and ``files`` (uncached outputs) under ``workspace/``; tag md5s.

        The parent gets ``dvc.out.<path>.md5`` for every output of the pipeline; each nested stage
        run of this flow run gets its own stage's dep and out md5s from ``dvc.lock``.
        """
        if not self.run_id:
            return
        import hashlib

        root = Path(root)
        client = self._mlflow.MlflowClient()
        lock = root / "dvc.lock"
        # not dvc.yaml: with a repo-local store (./mlruns) DVC would collect it as a second pipeline;
        # the run's dvc.yaml is the one at its git commit
        for rel in ("dvc.lock", "params.yaml", *files):
            if (root / rel).is_file():
                sub = str(Path("workspace") / Path(rel).parent).rstrip("/.")
                client.log_artifact(self.run_id, str(root / rel), sub)
        stages = _lock_stages(lock)
        tags: dict[str, str] = {}
        for entry in stages.values():
            tags.update({k: v for k, v in dvc_md5_tags(entry).items() if k.startswith("dvc.out.")})
        if lock.is_file():
            tags["dvc.lock.md5"] = hashlib.md5(lock.read_bytes()).hexdigest()
        if commit:
            tags["mergeflow.results_commit"] = commit
        for k, v in tags.items():
            client.set_tag(self.run_id, k, v)
        children = client.search_runs(
            [client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=5000,
        )
        for child in children:
            entry = stages.get(child.data.tags.get("mergeflow.stage", ""))
            for k, v in dvc_md5_tags(entry or {}).items():
                client.set_tag(child.info.run_id, k, v)


    def log_files(self, files: list[str | Path], artifact_path: str = "report") -> None:
        """Attach files (the report page and its SVG figures) to this run under ``artifact_path``."""
        if not self.run_id:
            return
        client = self._mlflow.MlflowClient()
        for f in files:
            client.log_artifact(self.run_id, str(f), artifact_path)


@contextlib.contextmanager
def flow_run(
    name: str, root: str | Path, prefect_run_id: str = "", prefect_run_url: str = ""
) -> Iterator[FlowRun]:
    """Open the parent MLflow run of a flow run; it ends FAILED if the flow raises.

    The flow process also serves its stage processes' logging (:func:`serve`): they connect to it
    instead of each importing MLflow (~12 s of CPU per stage item on 2 cores).
    """
    if not tracking_enabled():
        yield FlowRun(None, "", "", prefect_run_id, prefect_run_url)
        return
    uri = tracking_uri(root)
    check_server(uri)
    mlflow = _mlflow(uri)
    tags = {
        "mergeflow.kind": "flow",
        "mlflow.source.git.commit": git_commit(root),
        "prefect.flow_run_id": prefect_run_id,
        "prefect.flow_run_url": prefect_run_url,
    }
    with (
        mlflow.start_run(run_name=name, tags={k: v for k, v in tags.items() if v}) as run,
        serve(mlflow) as socket,
    ):
        yield FlowRun(mlflow, run.info.run_id, uri, prefect_run_id, prefect_run_url, socket)


def register_candidate(
    flow: FlowRun,
    model_dir: str | Path,
    name: str,
    score: float,
    tags: Mapping[str, str] | None = None,
    metric: str = "mean_normalized",
):
    """Register ``model_dir`` (logged under the parent run's ``model/``) as a new version of ``name``.

    The new version gets alias ``candidate``; it also becomes ``champion`` if there is no champion
    yet or its ``metric`` (stored as a version tag) is strictly higher than the champion's.

    Returns:
        The ``ModelVersion``; ``tags["promoted"]`` says whether it became champion.
    """
    from mlflow.exceptions import MlflowException

    client = flow._mlflow.MlflowClient()
    client.log_artifacts(flow.run_id, str(model_dir), "model")
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    source = f"{client.get_run(flow.run_id).info.artifact_uri}/model"
    vtags = {metric: f"{score:.6f}", **(tags or {})}
    mv = client.create_model_version(name, source=source, run_id=flow.run_id, tags=vtags)
    client.set_registered_model_alias(name, "candidate", mv.version)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        best = float(champ.tags.get(metric, "-inf"))
    except MlflowException:
        champ, best = None, float("-inf")
    promoted = score > best
    if promoted:
        client.set_registered_model_alias(name, "champion", mv.version)
    client.set_model_version_tag(name, mv.version, "promoted", str(promoted).lower())
    client.set_tag(flow.run_id, "mergeflow.model_version", f"{name}/{mv.version}")
    return client.get_model_version(name, mv.version)


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A browser link to a run when ``uri`` is an MLflow server; ``""`` for local stores."""
    if not uri.startswith(("http://", "https://")) or not run_id:
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _client(uri: str):
    _quiet()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_history(
    root: str | Path | None = None, model_name: str = "mergeflow-merged", max_runs: int = 1000
) -> dict[str, Any]:
    """What MLflow knows about past runs, as plain data (read only; never creates a store).

    Returns:
        ``{"uri", "experiment_id", "evaluations", "flows", "versions", "aliases"}``:
        ``evaluations`` — every ``evaluate`` stage run, oldest first: ``run_id``, ``status``,
        ``start_time`` (ms), ``parent_run_id``, ``tags`` and ``metrics`` (``<row>.mean_normalized``
        …); ``flows`` — flow (parent) run id → its tags; ``versions`` — the registered versions of
        ``model_name`` (``version``, ``run_id``, ``created`` ms, ``tags``); ``aliases`` — alias →
        version. All empty when there is no store or experiment yet.

    Raises:
        TrackingUnavailableError: the tracking server is unreachable.
    """
    uri = tracking_uri(root)
    out: dict[str, Any] = {
        "uri": uri, "experiment_id": "", "evaluations": [], "flows": {}, "versions": [],
        "aliases": {},
    }
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return out  # no local store yet: nothing has been tracked (and don't create one)
    check_server(uri)
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return out
    out["experiment_id"] = exp.experiment_id

    def runs(filter_string: str) -> list:
        return client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time ASC"],
            max_results=max_runs,
        )

    for r in runs("tags.`mergeflow.stage` = 'evaluate'"):
        out["evaluations"].append(
            {
                "run_id": r.info.run_id,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "parent_run_id": r.data.tags.get("mlflow.parentRunId", ""),
                "tags": dict(r.data.tags),
                "metrics": dict(r.data.metrics),
            }
        )
    for r in runs("tags.`mergeflow.kind` = 'flow'"):
        out["flows"][r.info.run_id] = {
            "status": r.info.status, "start_time": r.info.start_time, "tags": dict(r.data.tags)
        }
    try:
        out["aliases"] = dict(client.get_registered_model(model_name).aliases or {})
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        versions = []  # nothing registered yet
    out["versions"] = sorted(
        (
            {
                "version": int(v.version),
                "run_id": v.run_id or "",
                "created": v.creation_timestamp,
                "tags": dict(v.tags or {}),
            }
            for v in versions
        ),
        key=lambda v: v["version"],
    )
    out["aliases"] = {k: int(v) for k, v in out["aliases"].items()}
    return out


if __name__ == "__main__":  # a stage's sidecar (--serve, see _Sidecar) or the agent (see _agent)
    if sys.argv[1:2] == ["--agent"]:
        _agent(sys.argv[2], float(sys.argv[4]))
    else:
        _serve()
