"""MLflow lineage: one run per stage item with params, input/output hashes, git commit and metrics.

This is the only module that imports mlflow. The tracking URI comes from ``MLFLOW_TRACKING_URI``;
unset, runs go to a local SQLite store inside the repo (``mlflow.db``, ignored by git) with
artifacts under ``mlruns/``.

Each stage process logs its own run with MLflow's API (:func:`stage_run`). Lineage under Prefect:
the flow opens one parent run (:func:`flow_run`) and hands its id to the stage processes through
``MERGEFLOW_PARENT_RUN_ID`` (plus ``MERGEFLOW_FLOW_RUN_ID``/``_URL``), so every stage item's run
is nested under it; a stage process that is killed leaves its run RUNNING, and the flow marks it
FAILED (:func:`fail_orphaned_runs`). An unreachable tracking server is an explicit error
(:class:`TrackingUnavailableError`) before any stage runs, never a silent gap in the lineage;
``MERGEFLOW_TRACKING=off`` runs the pipeline deliberately without lineage. Only params from
``params.yaml``, md5s, ids and URLs are logged — never the environment (credentials live there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mergeflow.io import tree_md5

EXPERIMENT = os.environ.get("MERGEFLOW_EXPERIMENT", "mergeflow")
PARENT_ENV = "MERGEFLOW_PARENT_RUN_ID"  # set by the flow for its stage processes


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
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its level on import
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


class TrackingError(RuntimeError):
    """Logging a stage's lineage into MLflow failed."""


@contextlib.contextmanager
def _logging(op: str) -> Iterator[None]:
    """Report a failing MLflow call as :class:`TrackingError` naming the call and the store."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy, HTTP and file errors alike
        raise TrackingError(
            f"MLflow logging failed ({op}, tracking URI {tracking_uri()}): "
            f"{type(err).__name__}: {err}"
        ) from err


class StageRun:
    """Handle for logging into the active stage run (MLflow's active run of this process)."""

    def __init__(self, mlflow_module, run_id: str):
        self._mlflow = mlflow_module
        self._run_id = run_id

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self._run_id

    def metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested mappings are flattened)."""
        flat = {k: float(v) for k, v in flatten(values).items() if isinstance(v, int | float)}
        if flat:
            with _logging("metrics"):
                self._mlflow.log_metrics(flat, step=step)

    def stream(self, interval_s: float = 5.0) -> MetricStream:
        """Per-step metrics sent while the stage runs, batched (see :class:`MetricStream`)."""
        return MetricStream(self._mlflow.MlflowClient(), self._run_id, interval_s)

    def outputs(self, paths: Mapping[str, str | Path]) -> None:
        """Record the md5 of each output artifact as a tag ``output.<name>.md5`` (hashed now)."""
        tags = {f"output.{k}.md5": tree_md5(p) for k, p in paths.items()}
        with _logging("outputs"):
            self._mlflow.set_tags(tags)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a (small) file to the run's artifacts (copied before this returns)."""
        with _logging("artifact"):
            self._mlflow.log_artifact(str(path), artifact_path)

    def dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Log a dataset input (name, content digest, where it came from, which split)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with _logging("dataset"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                src = resolve_dataset_source(str(Path(source).resolve()))
            ds = MetaDataset(source=src, name=name, digest=digest[:36])
            self._mlflow.log_input(ds, context=context)


class MetricStream:
    """Per-step metrics (loss, validation accuracy ...) logged *while* a loop runs.

    Values are buffered and sent as one ``MlflowClient.log_batch`` at most every ``interval_s``
    seconds (and by :meth:`flush`, and on leaving the ``with`` block), so the MLflow UI's charts
    move during training at a cost of one request per interval rather than one per step.
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, client, run_id: str, interval_s: float = 5.0, clock=None):
        import time

        self._client, self._run_id, self.interval_s = client, run_id, interval_s
        self._clock = clock or time.monotonic
        self._buf: list = []
        self._sent_at = self._clock()
        self.batches = 0

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Queue ``values`` at ``step`` (timestamped now); send the queue if the interval passed."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buf += [Metric(k, float(v), ts, int(step)) for k, v in values.items()]
        if self._clock() - self._sent_at >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Send everything queued."""
        self._sent_at = self._clock()
        while self._buf:
            batch, self._buf = self._buf[: self.BATCH], self._buf[self.BATCH :]
            with _logging("metrics"):
                self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            self.batches += 1

    def __enter__(self) -> MetricStream:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        else:  # keep what was measured, but never mask the error that ends the block
            with contextlib.suppress(Exception):
                self.flush()


class _NoStream:
    """Stands in for :class:`MetricStream` when lineage is off."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Do nothing."""

    def flush(self) -> None:
        """Do nothing."""

    def __enter__(self) -> _NoStream:
        return self

    def __exit__(self, *exc) -> None:
        pass


class _NoRun:
    """Stands in for :class:`StageRun` when lineage is off (``MERGEFLOW_TRACKING=off``)."""

    run_id = ""

    def metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Do nothing."""

    def stream(self, interval_s: float = 5.0) -> _NoStream:
        """A stream that logs nothing."""
        return _NoStream()

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
    """Open an MLflow run for one stage item in this process; it ends FAILED if the block raises.

    Logs the stage's params (flattened), the md5 of every input artifact (``input.<name>.md5``),
    the git commit, the DVC stage name and, when Prefect runs the stage, its flow-run id and URL.
    Under a flow (``MERGEFLOW_PARENT_RUN_ID``, see :meth:`FlowRun.env`) the run is nested under
    the flow's parent run. A process killed inside the block cannot end its run: the flow does
    (:func:`fail_orphaned_runs`).

    Args:
        stage: DVC stage item name, e.g. ``finetune@rotten_tomatoes``.
        params: The params this stage depends on.
        inputs: Input artifacts (files or dirs) by name.
        tags: Extra tags.

    Yields:
        A :class:`StageRun` to log metrics and outputs into.

    Raises:
        TrackingUnavailableError: an HTTP tracking server does not answer (checked first).
        TrackingError: an MLflow call failed (naming the call and the tracking URI).
    """
    if not tracking_enabled():
        yield _NoRun()
        return
    check_server(timeout_s=10)
    all_tags = {
        "mergeflow.stage": stage,
        "mlflow.source.git.commit": git_commit(),
        **{f"input.{k}.md5": tree_md5(p) for k, p in (inputs or {}).items()},
        **(tags or {}),
    }
    flow = os.environ.get("PREFECT__FLOW_RUN_ID") or os.environ.get("MERGEFLOW_FLOW_RUN_ID")
    if flow:
        all_tags["prefect.flow_run_id"] = flow
    if os.environ.get("MERGEFLOW_FLOW_RUN_URL"):
        all_tags["prefect.flow_run_url"] = os.environ["MERGEFLOW_FLOW_RUN_URL"]
    with _logging("start"):
        mlflow = _mlflow()
        run = mlflow.start_run(
            run_name=stage, parent_run_id=os.environ.get(PARENT_ENV) or None, tags=all_tags
        )
    try:
        items = [(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            with _logging("params"):
                mlflow.log_params(dict(items[i : i + 100]))
        yield StageRun(mlflow, run.info.run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    with _logging("end"):
        mlflow.end_run("FINISHED")


def fail_orphaned_runs(lineage_env: Mapping[str, str], stage: str) -> list[str]:
    """End as FAILED the runs of stage item ``stage`` left RUNNING under the flow's parent run.

    A stage process that is killed (SIGKILL, a timeout, out of memory) cannot end its own run;
    the flow calls this once the process is gone. Only that item's runs are touched: items
    running side by side under the same parent keep theirs.

    Args:
        lineage_env: The flow's :meth:`FlowRun.env` (tracking URI, parent run id); without a
            parent run (lineage off) there is nothing to do.
        stage: The stage item (its runs' ``mergeflow.stage`` tag), e.g. ``finetune@sst2``.

    Returns:
        The ids of the runs now marked FAILED.
    """
    parent, uri = lineage_env.get(PARENT_ENV), lineage_env.get("MLFLOW_TRACKING_URI")
    if not parent or not uri:
        return []
    client = _client(uri)
    running = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )
    failed = [r.info.run_id for r in running if r.data.tags.get("mergeflow.stage") == stage]
    for run_id in failed:
        client.set_terminated(run_id, "FAILED")
    return failed


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

    def __init__(self, mlflow_module, run_id: str, uri: str, prefect_run_id: str, url: str):
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.uri = uri
        self._prefect = (prefect_run_id, url)

    def env(self) -> dict[str, str]:
        """Environment for the stage processes: nest their runs under this one."""
        env = {"MLFLOW_TRACKING_URI": self.uri} if self.run_id else {}
        if self.run_id:
            env[PARENT_ENV] = self.run_id
        if self._prefect[0]:
            env["MERGEFLOW_FLOW_RUN_ID"] = self._prefect[0]
        if self._prefect[1]:
            env["MERGEFLOW_FLOW_RUN_URL"] = self._prefect[1]
        return env

    def location(self) -> str:
        """Where to find this run: its URL on an MLflow server, else its id and the store."""
        if not self.run_id:
            return ""
        exp = self._mlflow.MlflowClient().get_run(self.run_id).info.experiment_id
        url = run_url(self.uri, exp, self.run_id)
        return url or f"run {self.run_id} in {self.uri} (`mlflow ui --backend-store-uri {self.uri}`)"

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
    """Open the parent MLflow run of a flow run; it ends FAILED if the flow raises."""
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
    with mlflow.start_run(run_name=name, tags={k: v for k, v in tags.items() if v}) as run:
        yield FlowRun(mlflow, run.info.run_id, uri, prefect_run_id, prefect_run_url)


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

