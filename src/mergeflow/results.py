"""Committed results of a long run: a workspace's metrics, report, stage times and settings.

``mergeflow results --root WS --out results/paper`` copies what a reader of the repo needs to
check a run's claims without rerunning it (the paper-regime profile takes ~2 h on 2 cores):

- ``eval.json``: ``metrics/eval.json`` byte for byte (per-task accuracies with 95 % intervals,
  ``n_test``, paired bootstrap intervals between rows; see :mod:`mergeflow.pipeline.evaluate`);
- ``summary.md``: ``reports/summary.md``;
- ``experts.json``: per task, the expert's validation accuracy, the step whose weights were kept
  and the steps run (early stopping), from ``models/experts/<task>/expert.json``;
- ``timings.json``: wall seconds per stage item and in total (measured by the caller);
- ``params.yaml``: the parameters the run used, byte for byte;
- ``lineage.json``: the workspace's git commit and the md5 of every DVC-tracked output
  (``dvc.lock``), so ``dvc pull`` at that commit restores the same artifacts.

An existing output directory is never overwritten without ``force``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mergeflow.io import write_json_atomic
from mergeflow.yamlio import load_yaml_file

FILES = ("eval.json", "summary.md", "experts.json", "timings.json", "params.yaml", "lineage.json")


class ResultsError(ValueError):
    """A workspace without the outputs a results directory needs, or a refused overwrite."""


def experts_summary(root: Path) -> dict[str, dict[str, Any]]:
    """Per task: validation accuracy, kept step and steps run of the expert (early stopping)."""
    params = load_yaml_file(root / "params.yaml")
    out = {}
    for task in [*params["tasks"], *(params.get("local_tasks") or {})]:  # catalogue, then local
        meta = json.loads((root / "models/experts" / task / "expert.json").read_text())
        out[task] = {
            k: meta.get(k) for k in ("val_accuracy", "best_step", "steps_run", "val_history")
        }
    return out


def lineage(root: Path) -> dict[str, Any]:
    """Git commit of the workspace and the md5 of each output recorded in ``dvc.lock``."""
    import subprocess

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    ).stdout.strip()
    lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").is_file() else {}
    outs = {}
    for stage, entry in (lock or {}).get("stages", {}).items():
        for o in entry.get("outs", []):
            outs[o["path"]] = {"md5": o.get("md5"), "stage": stage}
    return {"git_commit": commit or None, "outs": dict(sorted(outs.items()))}


def write(
    root: str | Path, out: str | Path, timings: dict[str, float], *, force: bool = False
) -> Path:
    """Write the results directory ``out`` from the reproduced workspace ``root``.

    Args:
        root: A workspace where ``dvc repro`` has run (``metrics/eval.json`` present).
        out: Results directory to create.
        timings: Stage item -> wall seconds (``benchmarks/paper.py`` times ``dvc repro``).
        force: Replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        ResultsError: Missing workspace outputs, or ``out`` exists and ``force`` is false.
    """
    root, out = Path(root), Path(out)
    needed = [root / "metrics/eval.json", root / "reports/summary.md", root / "params.yaml"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ResultsError(f"{root} has no {', '.join(missing)}: run `dvc repro` there first")
    if out.exists() and not force:
        raise ResultsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copyfile(root / "metrics/eval.json", tmp / "eval.json")
        shutil.copyfile(root / "reports/summary.md", tmp / "summary.md")
        shutil.copyfile(root / "params.yaml", tmp / "params.yaml")
        write_json_atomic(tmp / "experts.json", experts_summary(root))
        total = sum(timings.values())
        write_json_atomic(
            tmp / "timings.json", {"stages": dict(timings), "total_s": round(total, 1)}
        )
        write_json_atomic(tmp / "lineage.json", lineage(root))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
