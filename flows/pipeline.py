"""Prefect flow: the DVC pipeline as a DAG of Prefect tasks, one per stage item.

DVC decides what is stale; Prefect runs, retries, times out and records. The stage graph comes from
``dvc.yaml`` (``repo.index.graph``); every stage item is submitted with ``wait_for`` its upstream
items, so independent items (``prepare@*``, ``finetune@*``) fan out in parallel.

How parallel stages share one DVC repo (DVC holds a repo-wide lock for the whole of a
``dvc repro``): in ``parallel`` mode each task asks ``dvc status <item>`` under a flow-wide lock,
removes the item's stale outputs, runs the item's ``cmd`` *outside* the lock, then records it with
``dvc commit --force <item>`` under the lock again. Only the short DVC bookkeeping is serialized;
the expensive commands overlap. ``dvc.lock`` changes only after a command succeeded, so a stage
killed mid-run is simply stale on the next run. ``parallel=False`` runs ``dvc repro --single-item``
per item, one at a time (the reference behaviour). See docs/orchestration.md for the measurements.

Retries only on I/O-bound steps (``prepare`` reads source packages, ``base`` loads the model files,
``dvc push`` talks to S3); compute stages fail fast. Every stage command has a timeout and is killed
with its process group when it expires. Up-to-date items are skipped and say so. Each stage item is
one plain process that logs its own MLflow run; when it fails or is killed, its task ends the run it
left RUNNING as FAILED.

Progress while it runs (:mod:`mergeflow.progress`): the flow hands its stage processes a progress
directory (``MERGEFLOW_PROGRESS_DIR``); a stage with steps rewrites a small JSON file there, each
task records its item's state beside it and mirrors the stage's progress into a Prefect progress
artifact, and the flow shows the whole board — a live table in a terminal, plain lines at a
cadence in a log — and a summary block at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

ROOT = Path(__file__).resolve().parents[1]
IO_BOUND_STAGES = ("prepare", "base")  # retried: they read source packages / model files
IO_RETRIES = 2
IO_RETRY_DELAY_S = 3
DEFAULT_TIMEOUT_S = 6 * 3600.0
FLOW_LOCK = ".dvc/tmp/mergeflow-flow.lock"
TICK_S = 1.0  # how often the flow and its tasks look at the progress directory
ARTIFACT_EVERY_S = 3.0  # at most one Prefect progress-artifact update per item per this long


class WorkspaceBusyError(RuntimeError):
    """Another flow run is already writing this workspace."""


class StageTimeoutError(RuntimeError):
    """A stage command ran longer than its timeout and was killed."""


@dataclass(frozen=True)
class StageItem:
    """One stage item of ``dvc.yaml``: its command, outputs and upstream items."""

    name: str
    cmd: str
    outs: tuple[str, ...]
    upstream: tuple[str, ...]
    uncached: tuple[str, ...] = ()  # outs kept in git, not the DVC cache (metrics, reports, plots)

    @property
    def stage(self) -> str:
        """The stage name without the ``@item`` suffix."""
        return self.name.split("@", 1)[0]

    @property
    def io_bound(self) -> bool:
        """Whether failures are likely transient I/O (retried) rather than compute (not)."""
        return self.stage in IO_BOUND_STAGES


def stage_plan(root: Path = ROOT) -> list[StageItem]:
    """Stage items of ``dvc.yaml`` in dependency order, each with its upstream items."""
    import networkx as nx
    from dvc.repo import Repo

    def address(s) -> str:  # ``stage.addressing`` is relative to the cwd; make it relative to root
        rel = os.path.relpath(s.path, root)
        return s.name if rel == "dvc.yaml" else f"{rel}:{s.name}"

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges: stage -> the stages it depends on
        items = []
        for s in nx.topological_sort(graph.reverse(copy=True)):
            cmd = s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd)
            items.append(
                StageItem(
                    name=address(s),
                    cmd=cmd,
                    outs=tuple(os.path.relpath(o.fs_path, root) for o in s.outs),
                    upstream=tuple(sorted(address(d) for d in graph.successors(s))),
                    uncached=tuple(
                        os.path.relpath(o.fs_path, root) for o in s.outs if not o.use_cache
                    ),
                )
            )
        return items


def stage_order(root: Path = ROOT) -> list[str]:
    """Stage item names of ``dvc.yaml`` in dependency order (e.g. ``finetune@rotten_tomatoes``)."""
    return [s.name for s in stage_plan(root)]


def _dvc(root: str | Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``dvc`` (waiting for DVC's repo lock rather than failing on it)."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", "--wait-for-lock", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


_DVC_LOCKS: dict[str, threading.Lock] = {}
_SLOTS: dict[str, threading.BoundedSemaphore] = {}


def _dvc_lock(root: str) -> threading.Lock:
    """One lock per workspace for DVC bookkeeping inside this process."""
    return _DVC_LOCKS.setdefault(str(Path(root).resolve()), threading.Lock())


def is_stale(root: str | Path, name: str) -> bool:
    """Whether ``dvc status`` reports anything for this stage item (deps, params, outs).

    Raises:
        FileNotFoundError: a dependency is missing (as ``dvc repro`` refuses to start then).
    """
    proc = _dvc(root, "status", "--json", name)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status {name} failed:\n{proc.stderr[-2000:]}")
    status = json.loads(proc.stdout or "{}")
    for entry in status.get(name, []):
        deps = entry.get("changed deps", {}) if isinstance(entry, dict) else {}
        missing = [p for p, why in deps.items() if why == "deleted"]
        if missing:
            raise FileNotFoundError(f"stage {name}: dependency {', '.join(missing)} does not exist")
    return bool(status)


def run_command(
    cmd: str | list[str],
    root: str | Path,
    env: dict[str, str],
    timeout_s: float,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = TICK_S,
) -> subprocess.CompletedProcess:
    """Run a command (a shell string or an argv list) in its own session and process group.

    The group is killed when the command times out or the caller is interrupted; it holds
    everything the command started that did not start a session of its own — for ``dvc repro``,
    the stage process DVC runs under it. ``on_tick`` is called about every ``tick_s`` seconds
    while the command runs (its output keeps being collected meanwhile).
    """
    proc = subprocess.Popen(
        cmd,
        shell=isinstance(cmd, str),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                out, err = proc.communicate(timeout=max(0.0, min(tick_s, left)))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
                if on_tick is not None:
                    on_tick()
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        raise StageTimeoutError(f"timed out after {timeout_s:g} s and was killed: {shown}") from None
    except BaseException:  # the flow itself is being cancelled or killed: take the stage with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def artifact_key(item: str) -> str:
    """A Prefect artifact key for an item's progress (lowercase letters, digits and dashes)."""
    import re

    return "progress-" + re.sub(r"[^a-z0-9]+", "-", item.lower()).strip("-")


class ItemProgress:
    """A task's side of live progress: its item's state, and a Prefect progress artifact.

    The state goes into the flow's progress directory (:func:`mergeflow.progress.mark`); the
    artifact follows the stage's own progress file and ends at 100 % when the item ran. A
    failing Prefect API is logged once, never fatal to the stage.
    """

    def __init__(self, directory: str | None, item: str, clock=time.monotonic):
        from mergeflow import progress

        self._p, self.directory, self.item, self._clock = progress, directory, item, clock
        self.started = time.time()
        self.artifact_id = None
        self.percent = None
        self._sent_at = -float("inf")
        self._warned = False
        if directory:
            progress.mark(directory, item, "checking", self.started)

    def _prefect(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as err:  # noqa: BLE001 - progress is a view, never a failure
            if not self._warned:
                get_run_logger().warning("%s: progress artifact not updated: %s", self.item, err)
                self._warned = True
            return None

    def command_started(self) -> None:
        """The stage command starts: the item is running, its progress artifact at 0 %."""
        from prefect.artifacts import create_progress_artifact

        if self.directory:
            self._p.mark(self.directory, self.item, "running", time.time())
        self.percent = 0.0
        self._sent_at = self._clock()
        self.artifact_id = self._prefect(
            create_progress_artifact, 0.0, key=artifact_key(self.item),
            description=f"`{self.item}`: started",
        )

    def tick(self) -> None:
        """Mirror the stage's progress file into the artifact (when it moved; throttled)."""
        if not self.directory or self.artifact_id is None:
            return
        if self._clock() - self._sent_at < ARTIFACT_EVERY_S:
            return
        view = self._p.read_board(self.directory, [self.item])[0]
        frac = view.fraction
        if frac is None or round(100 * frac, 1) == self.percent:
            return
        self._send(round(100 * frac, 1), f"`{self.item}`: {self._p.describe(view)}")

    def _send(self, percent: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        self.percent, self._sent_at = percent, self._clock()
        if self.artifact_id is not None:
            self._prefect(update_progress_artifact, self.artifact_id, percent, description)

    def finished(self, state: str, error: str = "") -> None:
        """Record the item's final state; the artifact reaches 100 % when the item ran."""
        ended = time.time()
        if self.directory:
            self._p.mark(self.directory, self.item, state, self.started, ended, error)
        took = self._p.fmt_duration(ended - self.started)
        if state == "ran":
            self._send(100.0, f"`{self.item}`: ran in {took}")
        elif state == "failed" and self.percent is not None:
            self._send(self.percent, f"`{self.item}`: failed after {took}: {error}")


def _stage_env(item: StageItem, lineage_env: dict[str, str], threads: int | None) -> dict:
    env = _env(lineage_env)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
    return env


@contextlib.contextmanager
def _failing_runs_closed(item: StageItem, lineage_env: dict[str, str]):
    """Close the MLflow run of a stage process that failed in the block, then re-raise.

    A stage that exits non-zero after an exception has ended its run FAILED itself; one that was
    killed (by a timeout here, the OOM killer, a signal) left it RUNNING under the flow's run.
    """
    try:
        yield
    except BaseException:
        from mergeflow import tracking

        try:
            ended = tracking.fail_orphaned_runs(lineage_env, item.name)
        except Exception as err:  # noqa: BLE001 - never mask the stage's own failure
            get_run_logger().warning("%s: could not close its MLflow run: %s", item.name, err)
        else:
            if ended:
                get_run_logger().info("%s: MLflow run %s marked FAILED", item.name, ", ".join(ended))
        raise


@task(name="dvc-stage", task_run_name="{item.name}", cache_policy=NO_CACHE)
def run_stage(
    item: StageItem,
    root: str,
    lineage_env: dict[str, str],
    parallel: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    progress_dir: str | None = None,
) -> str:
    """Run one stage item unless DVC says it is up to date; returns ``ran`` or ``skipped``.

    With ``progress_dir`` (see :mod:`mergeflow.progress`) the stage process reports into it and
    the task records the item's state there; either way the task keeps a Prefect progress
    artifact of the running command.
    """
    from mergeflow.progress import ENV

    logger = get_run_logger()
    env = _stage_env(item, lineage_env, threads)
    if progress_dir:
        env[ENV] = progress_dir
    lock = _dvc_lock(root)
    t0 = time.monotonic()
    board = ItemProgress(progress_dir, item.name)
    try:
        result = _run_item(item, root, env, lineage_env, lock, parallel, timeout_s, board)
    except BaseException as err:
        board.finished("failed", (str(err).strip().splitlines() or [type(err).__name__])[0][:300])
        raise
    board.finished(result)
    if result == "skipped":
        logger.info("%s: up to date, skipped", item.name)
    else:
        logger.info("%s: ran in %.1f s", item.name, time.monotonic() - t0)
    return result


def _run_item(item, root, env, lineage_env, lock, parallel, timeout_s, board) -> str:
    """The body of :func:`run_stage`: ``ran`` or ``skipped``, or raise."""
    if not parallel:
        cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", item.name]
        with _failing_runs_closed(item, lineage_env), lock:
            board.command_started()
            proc = run_command(cmd, root, env, timeout_s, on_tick=board.tick)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"stage {item.name} failed:\n{(proc.stderr or proc.stdout)[-4000:]}"
                )
        skipped = "didn't change, skipping" in proc.stdout or "is cached - skipping" in proc.stdout
        return "skipped" if skipped else "ran"

    with lock:
        if not is_stale(root, item.name):
            return "skipped"
        for out in item.outs:  # as `dvc repro` does: a stage starts from no outputs
            p = Path(root) / out
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    slots = _SLOTS.get(str(Path(root).resolve())) or contextlib.nullcontext()
    with _failing_runs_closed(item, lineage_env), slots:
        get_run_logger().info("%s: running `%s`", item.name, item.cmd)
        board.command_started()
        proc = run_command(item.cmd, root, env, timeout_s, on_tick=board.tick)
        if proc.returncode != 0:
            raise RuntimeError(
                f"stage {item.name} failed (exit {proc.returncode}):\n"
                f"{(proc.stderr or proc.stdout)[-4000:]}"
            )
    with lock:
        commit = _dvc(root, "commit", "--force", item.name)
    if commit.returncode != 0:
        raise RuntimeError(f"dvc commit {item.name} failed:\n{commit.stderr[-2000:]}")
    return "ran"


@task(name="dvc-push", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S, cache_policy=NO_CACHE)
def push_outputs(root: str) -> str:
    """``dvc push`` to the S3 remote configured from the environment (retried: network I/O)."""
    from mergeflow import remote

    summary = remote.push(Path(root))
    get_run_logger().info("dvc push: %s", summary)
    return summary


@contextlib.contextmanager
def workspace_lock(root: str | Path):
    """Hold an exclusive lock on the workspace for the whole flow run (no two runs write it)."""
    path = Path(root) / FLOW_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise WorkspaceBusyError(
                f"workspace {root} is being written by another flow run ({fh.read().strip()}); "
                "wait for it or use another workspace"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def apply_overrides(root: str | Path, overrides: dict[str, Any] | None) -> None:
    """Validate ``params.yaml`` (with ``overrides`` merged in) before any stage runs; write them.

    The whole file is checked, merge methods included, so a typo fails the flow at once rather
    than the coefficients stage after hours of fine-tuning.
    """
    from mergeflow.config import ConfigError, deep_merge, parse_params
    from mergeflow.io import write_bytes_atomic
    from mergeflow.methods.params import check_config
    from mergeflow.yamlio import (
        YAMLInputError,
        dump_yaml_roundtrip,
        load_yaml,
        load_yaml_roundtrip,
        update_roundtrip,
    )

    path = Path(root) / "params.yaml"
    source = f"{path} + flow overrides" if overrides else str(path)
    try:
        doc, text = load_yaml_roundtrip(path)
        plain = load_yaml(text, str(path))
        merged = deep_merge(plain, overrides or {}) if isinstance(plain, dict) else plain
    except YAMLInputError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"{path}: {err}") from None
    check_config(parse_params(merged, source=source), source)
    if overrides and update_roundtrip(doc, overrides):  # comments and layout kept
        write_bytes_atomic(path, dump_yaml_roundtrip(doc, text).encode())


def git_commit_results(root: str | Path, message: str) -> str | None:
    """Commit ``dvc.lock``, ``params.yaml`` and the small uncached results; returns the commit."""
    paths = ["dvc.lock", "params.yaml"]
    untracked = subprocess.run(
        ["git", "ls-files", "-mo", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    paths += [
        p
        for p in untracked
        if p.endswith(".gitignore") or p.startswith(("metrics/", "reports/", "plots/"))
    ]
    paths = [p for p in dict.fromkeys(paths) if (Path(root) / p).exists()]
    subprocess.run(["git", "add", "--", *paths], cwd=root, check=True)
    if not subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode:
        return None
    subprocess.run(
        ["git", "-c", "user.email=mergeflow@localhost", "-c", "user.name=mergeflow"]
        + ["commit", "-qm", message],
        cwd=root,
        check=True,
    )
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def _publish_artifacts(root: Path, results: dict[str, str]) -> None:
    from prefect.artifacts import create_markdown_artifact

    rows = "\n".join(f"| `{k}` | {v} |" for k, v in results.items())
    create_markdown_artifact(
        key="stages", markdown="| stage item | result |\n|---|---|\n" + rows, description="stages"
    )
    lock = root / "dvc.lock"
    if lock.is_file():
        create_markdown_artifact(
            key="dvc-lock",
            markdown=f"```yaml\n{lock.read_text()}```\n",
            description="dvc.lock of this run (md5 of every dep and out)",
        )
    report = root / "reports" / "summary.md"
    if report.is_file():
        create_markdown_artifact(
            key="summary", markdown=report.read_text(), description="headline evaluation table"
        )


def publish_report(root: Path, parent, status: tuple[str, str]) -> Path | None:
    """Write the dashboard ``reports/index.html`` and publish it.

    The page and its SVG figures go to the flow's MLflow run (``report/``), the headline table to
    a Prefect table artifact. A broken report is logged, never fatal: the dashboard must not fail
    (or mask the failure of) the pipeline it reports on.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from mergeflow.report import write_report

    logger = get_run_logger()
    page = root / "reports" / "index.html"
    try:
        with tempfile.TemporaryDirectory() as figs:
            rep = write_report(root, page, status=status, figures_dir=figs)
            parent.log_files([page, *sorted(Path(figs).glob("*.svg"))], "report")
        if rep.headline:
            create_table_artifact(
                key="headline",
                table=rep.headline,
                description="test accuracy per task, mean accuracy and mean normalized (÷ expert)",
            )
        else:
            missing = "\n".join(f"- {n.what}: {n.why}" for n in rep.missing)
            create_markdown_artifact(
                key="headline", markdown=f"**No evaluation to show.**\n\n{missing}\n",
                description="headline table (missing)",
            )
    except Exception as err:  # noqa: BLE001 - reported, not raised (see docstring)
        logger.warning("dashboard not written: %s: %s", type(err).__name__, err)
        return None
    logger.info("dashboard: %s (%d charts, %d notice(s))", page, len(rep.figures), len(rep.missing))
    return page


def _prefect_console_handler():
    """Prefect's console log handler (on the root logger), if logging is configured."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    return next(
        (h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)), None
    )


def _console():
    """A console on the stream Prefect logs to (stderr), with rich's default styles.

    Prefect's own console has only Prefect's log styles (a table on it fails), so the live view
    gets this one, and Prefect's handler prints through it while the view is up
    (:func:`_logs_above`).
    """
    from rich.console import Console

    handler = _prefect_console_handler()
    return Console(file=handler.stream if handler else sys.stderr, markup=False, highlight=False)


@contextlib.contextmanager
def _logs_above(console, live: bool):
    """While a live view is up, Prefect's log lines print through its console (above it)."""
    handler = _prefect_console_handler() if live else None
    if handler is None:
        yield
        return
    before = handler.console
    handler.console = console
    try:
        yield
    finally:
        handler.console = before


def _where(parent, url: str, run_name: str, fid: str) -> dict[str, str]:
    """Where to look after the run: the MLflow parent run and the Prefect flow run."""
    try:
        mlflow_at = parent.location() or "not tracked (MERGEFLOW_TRACKING=off)"
    except Exception as err:  # noqa: BLE001 - a summary line, never a failure
        mlflow_at = f"run {parent.run_id} ({type(err).__name__} reading it)"
    from prefect.utilities.urls import url_for

    try:  # the UI route Prefect itself prints ("View at ..."); runtime's ui_url uses an older one
        url = (url_for("flow-run", obj_id=fid) if fid else None) or url
    except Exception:  # noqa: BLE001 - a summary line, never a failure
        pass
    prefect_at = url or f"flow run {run_name} ({fid}): `prefect flow-run inspect {fid}`"
    return {"MLflow run": mlflow_at, "Prefect flow run": prefect_at}


def best_merge(root: Path):
    """The merge with the highest mean normalized accuracy in ``metrics/eval.json``, if any."""
    from mergeflow.progress import BestMerge
    from mergeflow.report.inputs import load_evaluation

    ev, _ = load_evaluation(root)
    name = ev.best_merge() if ev is not None else None
    if name is None:
        return None
    row = ev.rows[name]
    return BestMerge(
        name, row["mean_normalized"], row.get("mean_normalized_ci"), row.get("mean_accuracy")
    )


def _summary(monitor, root: Path, wall_s: float, page, where: dict, status: str) -> None:
    """Show the end-of-run block and keep it as the Prefect artifact ``run-summary``."""
    from prefect.artifacts import create_markdown_artifact

    from mergeflow import progress

    try:
        best = best_merge(root)
    except Exception:  # noqa: BLE001 - the report says why eval.json is unusable
        best = None
    try:
        block = progress.summary_block(
            monitor.board, wall_s, best, {"dashboard": str(page or ""), **where}, status
        )
        monitor.print(block)
    except Exception as err:  # noqa: BLE001 - never mask the run's own result or error
        get_run_logger().warning("summary not shown: %s: %s", type(err).__name__, err)
        return
    with contextlib.suppress(Exception):
        create_markdown_artifact(
            key="run-summary", markdown=f"```\n{progress.render_text(block)}\n```\n",
            description="wall time per stage, skipped items, best merge, where to look",
        )


@flow(name="mergeflow-pipeline")
def pipeline(
    root: str = str(ROOT),
    overrides: dict[str, Any] | None = None,
    parallel: bool = True,
    max_parallel: int = 3,
    stage_timeout_s: float = DEFAULT_TIMEOUT_S,
    push: bool | None = None,
    git_commit: bool = False,
    register_model: bool = True,
    model_name: str = "mergeflow-merged",
) -> dict[str, str]:
    """Run every stage item of ``dvc.yaml``; returns stage item → ``ran``/``skipped``.

    Args:
        root: The workspace (a git + DVC repo with ``dvc.yaml``).
        overrides: Nested ``params.yaml`` overrides for this run (validated, then written).
        parallel: Fan out independent stage items (else one ``dvc repro --single-item`` at a time).
        max_parallel: At most this many stage commands at once.
        stage_timeout_s: Kill a stage command after this many seconds.
        push: ``dvc push`` after success; default: when an S3 remote is configured in the env.
        git_commit: Commit ``dvc.lock``/params/metrics in the workspace after success.
        register_model: Register the best merge in the MLflow Model Registry when ``evaluate`` ran.
        model_name: Registered model name.
    """
    from prefect.futures import wait as wait_futures
    from prefect.runtime import flow_run

    from mergeflow import progress, remote, tracking

    logger = get_run_logger()
    ws = Path(root).resolve()
    with workspace_lock(ws):
        apply_overrides(ws, overrides)
        tracking.check_server()  # explicit error before any stage runs if MLflow is unreachable
        do_push = remote.remote_from_env() is not None if push is None else push
        if do_push:
            remote.check(remote.require_remote_from_env())  # fail before hours of training
        plan = stage_plan(ws)
        _SLOTS[str(ws)] = threading.BoundedSemaphore(max(1, max_parallel))
        cpus = os.cpu_count() or 1
        url = flow_run.ui_url or ""
        fid, run_name = str(flow_run.id or ""), flow_run.name or "local"
        t0 = time.monotonic()
        with (
            tracking.flow_run(f"flow {run_name}", ws, prefect_run_id=fid, prefect_run_url=url)
            as parent,
            tempfile.TemporaryDirectory(prefix="mergeflow-progress-") as progress_dir,
        ):
            lineage_env = parent.env()
            console = _console()
            monitor = progress.Monitor(
                progress_dir, [s.name for s in plan], console=console, log=logger.info
            )
            futures: dict[str, Any] = {}
            with _logs_above(console, monitor.is_live), monitor:
                for item in plan:
                    fan = [s for s in plan if s.stage == item.stage and "@" in s.name]
                    width = min(max_parallel, len(fan)) if parallel and fan else 1
                    task_fn = run_stage.with_options(
                        retries=IO_RETRIES if item.io_bound else 0,
                        retry_delay_seconds=IO_RETRY_DELAY_S,
                    )
                    futures[item.name] = task_fn.submit(
                        item,
                        str(ws),
                        lineage_env,
                        parallel=parallel,
                        timeout_s=stage_timeout_s,
                        threads=max(1, cpus // width) if width > 1 else None,
                        progress_dir=progress_dir,
                        wait_for=[futures[u] for u in item.upstream if u in futures],
                    )
                pending = list(futures.values())
                while pending:  # the board moves while the items run
                    pending = list(wait_futures(pending, timeout=TICK_S).not_done)
                    monitor.tick()
            where = _where(parent, url, run_name, fid)
            try:
                results = {name: f.result() for name, f in futures.items()}
            except Exception as err:
                why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                page = publish_report(ws, parent, ("failed", f"This flow run failed: {why}"))
                _summary(monitor, ws, time.monotonic() - t0, page, where, "failed")
                raise
            ran = [k for k, v in results.items() if v == "ran"]
            logger.info("%d stage item(s) ran, %d up to date", len(ran), len(results) - len(ran))
            commit = git_commit_results(ws, f"mergeflow run {fid}") if git_commit else None
            parent.record_workspace(ws, [u for s in plan for u in s.uncached], commit=commit)
            if do_push:
                push_outputs(str(ws))
            if register_model and results.get("evaluate") == "ran":
                if str(ROOT) not in sys.path:
                    sys.path.insert(0, str(ROOT))
                from flows.lineage import register_best_merge

                mv = register_best_merge(ws, parent, model_name)
                if mv is not None:
                    logger.info(
                        "registered %s v%s (champion: %s)", model_name, mv.version, mv.tags["promoted"]
                    )
            _publish_artifacts(ws, results)
            page = publish_report(
                ws, parent, ("ok", f"Flow run {run_name}: {len(ran)} stage item(s) "
                             f"ran, {len(results) - len(ran)} up to date")
            )
            _summary(monitor, ws, time.monotonic() - t0, page, where, "finished")
    return results


if __name__ == "__main__":
    pipeline()
