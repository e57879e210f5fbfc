"""MLflow lineage: one run per stage item with params, input/output hashes, git commit and metrics.

This is the only module that imports mlflow. The tracking URI comes from ``MLFLOW_TRACKING_URI``;
unset, runs go to a local SQLite store inside the repo (``mlflow.db``, ignored by git) with
artifacts under ``mlruns/``.
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


def tracking_uri() -> str:
    """The MLflow tracking URI in force (env, else ``sqlite:///<cwd>/mlflow.db``)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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


class StageRun:
    """Handle for logging into the active stage run."""

    def __init__(self, mlflow_module, run):
        self._mlflow = mlflow_module
        self.run = run

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self.run.info.run_id

    def metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested mappings are flattened)."""
        flat = {k: float(v) for k, v in flatten(values).items() if isinstance(v, int | float)}
        if flat:
            self._mlflow.log_metrics(flat, step=step)

    def outputs(self, paths: Mapping[str, str | Path]) -> None:
        """Record the md5 of each output artifact as a tag ``output.<name>.md5``."""
        self._mlflow.set_tags({f"output.{k}.md5": tree_md5(p) for k, p in paths.items()})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a (small) file to the run's artifacts."""
        self._mlflow.log_artifact(str(path), artifact_path)

    def dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Log a dataset input (name, content digest, where it came from, which split)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(str(Path(source).resolve()))
        ds = MetaDataset(source=src, name=name, digest=digest[:36])
        self._mlflow.log_input(ds, context=context)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | Path] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run for one stage item.

    Logs the stage's params (flattened), the md5 of every input artifact (``input.<name>.md5``),
    the git commit, the DVC stage name and, when Prefect runs the stage, its flow-run id.

    Args:
        stage: DVC stage item name, e.g. ``finetune@rotten_tomatoes``.
        params: The params this stage depends on.
        inputs: Input artifacts (files or dirs) by name.
        tags: Extra tags.

    Yields:
        A :class:`StageRun` to log metrics and outputs into.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    all_tags = {
        "mergeflow.stage": stage,
        "mlflow.source.git.commit": git_commit(),
        **{f"input.{k}.md5": tree_md5(p) for k, p in (inputs or {}).items()},
        **(tags or {}),
    }
    parent = os.environ.get("MERGEFLOW_PARENT_RUN_ID")
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID") or os.environ.get("MERGEFLOW_FLOW_RUN_ID")
    if flow_run:
        all_tags["prefect.flow_run_id"] = flow_run
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield StageRun(mlflow, run)
