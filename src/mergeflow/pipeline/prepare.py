"""Stages ``prepare@<task>`` and ``prepare_local@<task>``: a task's corpus -> seeded splits.

A catalogue task's corpus comes from its registry package (:mod:`mergeflow.data.catalogue`); a
``local_tasks:`` entry's from the user's file (:func:`mergeflow.data.local_task`), which is the DVC
dependency of its ``prepare_local`` item, so editing it reruns that task alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeflow import data
from mergeflow.config import Params, PoisonCfg
from mergeflow.io.hashing import tree_md5
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
    )  # a sentence pair gets the trigger in its first text
    splits["train"] = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    return poison.model_dump() | {"n_poisoned": len(idx), "split": "train"}


def task_source(cfg: Params, task: str) -> tuple[data.TaskSpec, dict]:
    """The spec of ``task`` (a ``local_tasks`` entry or a catalogue name) and its provenance.

    Raises:
        DataError: The task is neither, or its local file cannot be read (the message names the
            ``local_tasks`` entry, the column and the row at fault).
    """
    local = cfg.local_tasks.get(task)
    if local is None:
        if task not in cfg.tasks:
            raise data.DataError(f"task {task!r} is not in params.yaml's tasks or local_tasks")
        return data.get_task(task), data.task_provenance(task)
    spec = data.local_task(
        task,
        local.path,
        text_field=local.text,
        text_pair_field=local.text_pair,
        label_field=local.label,
        label_names=local.label_names,
        licence=local.licence,
        description=local.description,
        where=f"local_tasks.{task}",
    )
    columns = {"text": local.text, "text_pair": local.text_pair, "label": local.label}
    return spec, {"file": local.path, "md5": tree_md5(local.path), "columns": columns}


def run(cfg: Params, paths: Paths) -> dict:
    """Load the task's corpus, split it with ``cfg.seed`` and write the split files atomically.

    The corpus is a catalogue task's (``tasks:``) or the file of a ``local_tasks:`` entry; texts
    may be ``(text, text_pair)`` pairs (a sentence-pair task), written as ``text``/``text_pair``.
    With ``safety.enabled`` and this task as ``safety.poison.task``, the train split is poisoned
    (:func:`mergeflow.safety.poison_split`) and ``meta.json`` records it under ``poison``; the
    finetune stage then trains the backdoored expert from it unchanged.
    """
    spec, provenance = task_source(cfg, paths.task)
    if "file" in provenance:
        texts, labels = spec.loader(Path())  # read, checked and cleaned by data.load_local
    else:
        texts, labels, _ = data.load_task(paths.task)
    names = spec.label_names
    try:
        splits = data.make_splits(
            texts,
            labels,
            seed=cfg.seed,
            n_train=cfg.data.n_train,
            n_val=cfg.data.n_val,
            n_test=cfg.data.n_test,
        )
    except data.DataError as err:
        raise data.DataError(f"task {paths.task!r}: {err}") from None
    extra = {}
    poison = cfg.safety.poison
    if cfg.safety.enabled and poison is not None and poison.task == paths.task:
        extra["poison"] = poison_train(splits, poison, len(names))
    with stage_run(
        cfg.stage_item("prepare", paths.task),
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
                "provenance": provenance,
            }
            | extra,
        )
        for split, digest in meta["sha256"].items():
            tr.dataset(paths.task, digest, str(Path(paths.out) / f"{split}.jsonl"), split)
        tr.metrics({f"n_{k}": v for k, v in meta["counts"].items()} | {"n_classes": len(names)})
        tr.outputs({"splits": paths.out})
    return meta
