"""Deployments: a cron-scheduled ``retrain`` of the pipeline flow on the ``gpu`` work pool.

    python flows/deploy.py --workspace /data/mergeflow            # cron 0 3 * * *, pool gpu
    prefect worker start --pool gpu                               # on the machine(s) with GPUs

The work pool is created if missing (``process`` type locally; on Kubernetes create it from
``infra/k8s/gpu-work-pool.json`` instead, which requests ``nvidia.com/gpu``). Two retrains never
write one workspace: the deployment has ``concurrency_limit=1`` (a second run waits in
``AwaitingConcurrencySlot``) and the flow itself holds an exclusive lock on the workspace.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:pipeline"


def ensure_work_pool(name: str = "gpu", pool_type: str = "process") -> None:
    """Create the work pool unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
        except ObjectAlreadyExists:
            pass


def deploy_retrain(
    source: str | Path = ROOT,
    workspace: str | Path | None = None,
    name: str = "retrain",
    pool: str = "gpu",
    cron: str | None = "0 3 * * *",
    interval_s: float | None = None,
    parameters: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> str:
    """Register the ``retrain`` deployment; returns its id.

    Args:
        source: Where the worker loads the flow code from (a directory; no git needed).
        workspace: The DVC workspace the runs write (default: ``source``).
        name: Deployment name.
        pool: Work pool (created as ``process`` type if missing).
        cron: Cron schedule (UTC); ``None`` with ``interval_s`` for an interval schedule.
        interval_s: Interval schedule in seconds (instead of ``cron``).
        parameters: Default flow parameters (e.g. ``overrides``, ``max_parallel``).
        job_variables: Work-pool job variables (e.g. ``env`` for the process worker).
    """
    from prefect import flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    ensure_work_pool(pool)
    params = {"root": str(Path(workspace or source).resolve()), "git_commit": True}
    params.update(parameters or {})
    remote_flow = flow.from_source(source=str(Path(source).resolve()), entrypoint=ENTRYPOINT)
    return str(
        remote_flow.deploy(
            name=name,
            work_pool_name=pool,
            cron=cron if interval_s is None else None,
            interval=interval_s,
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
            parameters=params,
            job_variables=job_variables or {},
            tags=["mergeflow", "retrain"],
            description="Scheduled retraining: the DVC pipeline, pushed to S3, lineage in MLflow.",
            print_next_steps=False,
        )
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/deploy.py [--workspace DIR] [--cron EXPR] [--pool gpu]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT), help="flow code directory")
    ap.add_argument("--workspace", default=None, help="DVC workspace the runs write")
    ap.add_argument("--name", default="retrain")
    ap.add_argument("--pool", default="gpu")
    ap.add_argument("--cron", default="0 3 * * *")
    ap.add_argument("--interval", type=float, default=None, help="seconds (replaces --cron)")
    args = ap.parse_args(argv)
    dep = deploy_retrain(
        args.source, args.workspace, args.name, args.pool, args.cron, args.interval
    )
    print(dep)


if __name__ == "__main__":
    main()
