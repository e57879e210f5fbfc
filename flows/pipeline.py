"""Prefect flow: run the DVC pipeline stage by stage, one Prefect task per stage item.

DVC decides what is stale: an up-to-date stage is skipped by ``dvc repro --single-item`` and the
task says so. With no ``PREFECT_API_URL`` set, Prefect starts its ephemeral local API.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

ROOT = Path(__file__).resolve().parents[1]


def stage_order(root: Path = ROOT) -> list[str]:
    """Stage items of ``dvc.yaml`` in dependency order (e.g. ``finetune@rotten_tomatoes``)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        return [s.addressing for s in nx.topological_sort(graph.reverse(copy=True))]


def _dvc() -> list[str]:
    return [sys.executable, "-m", "dvc"]


@task(name="dvc-stage", task_run_name="{name}")
def run_stage(name: str, root: str, flow_run_id: str) -> str:
    """``dvc repro --single-item <name>``; returns ``ran`` or ``skipped`` (already up to date)."""
    logger = get_run_logger()
    env = dict(os.environ, MERGEFLOW_FLOW_RUN_ID=flow_run_id)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [*_dvc(), "repro", "--single-item", name], cwd=root, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{proc.stderr[-4000:] or proc.stdout[-4000:]}")
    skipped = "didn't change, skipping" in proc.stdout or "is cached - skipping" in proc.stdout
    logger.info("%s: %s", name, "up to date, skipped" if skipped else "ran")
    return "skipped" if skipped else "ran"


@flow(name="mergeflow-pipeline")
def pipeline(root: str = str(ROOT)) -> dict[str, str]:
    """Run every stage of ``dvc.yaml`` in dependency order; returns stage → ran/skipped."""
    from prefect.runtime import flow_run

    results = {}
    for name in stage_order(Path(root)):
        results[name] = run_stage(name, root, str(flow_run.id))
    return results


if __name__ == "__main__":
    pipeline()
