"""Reading and writing the pipeline's artifacts (the on-disk contract between stages).

Layout (paths themselves come from ``dvc.yaml``):

- task data dir: ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``meta.json``
- base model dir: ``save_pretrained`` of the encoder (``model.safetensors``, ``config.json``) + tokenizer
- expert dir: ``save_pretrained`` of the task's sequence classifier + tokenizer (+ ``adapter/`` for LoRA)
  + ``probe_head.safetensors``: a linear-probe head fitted on θ_0's frozen features (the "base" row)
- task-vector dir: ``<task>.safetensors`` holding τ_t = θ_t − θ_0 over the encoder's keys
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeflow import tensors
from mergeflow.data import read_meta, read_split
from mergeflow.io import CheckpointError, check_finite, load_state_dict
from mergeflow.models.hf import split_state_dict
from mergeflow.models.inference import Batches, tokenize

WEIGHTS = "model.safetensors"


def weights_file(model_dir: str | Path) -> Path:
    """The single safetensors file of a model dir (refusing pickles with a how-to-convert message)."""
    d = Path(model_dir)
    f = d / WEIGHTS
    if f.is_file():
        return f
    pickles = [p.name for p in d.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        from mergeflow.io import refuse_pickle

        refuse_pickle(str(d / pickles[0]))
    raise CheckpointError(f"{d}: no {WEIGHTS} (expected a save_pretrained(safe_serialization) dir)")


def load_base_encoder(base_dir: str | Path) -> dict[str, torch.Tensor]:
    """θ_0: the base encoder's tensors (checked finite)."""
    f = weights_file(base_dir)
    sd = load_state_dict(f)
    check_finite(sd, str(f))
    return sd


def load_expert(expert_dir: str | Path, prefix: str) -> tuple[dict, dict]:
    """(encoder, head) tensors of a fine-tuned expert."""
    f = weights_file(expert_dir)
    sd = load_state_dict(f)
    check_finite(sd, str(f))
    return split_state_dict(sd, prefix)


PROBE_HEAD = "probe_head.safetensors"


def load_probe_head(expert_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The linear-probe head on θ_0 saved beside an expert (None for experts from before it)."""
    f = Path(expert_dir) / PROBE_HEAD
    if not f.is_file():
        return None
    sd = load_state_dict(f)
    check_finite(sd, str(f))
    return sd


def expert_prefix(expert_dir: str | Path) -> str:
    """The encoder prefix (``bert``...) recorded by the finetune stage."""
    meta = json.loads((Path(expert_dir) / "expert.json").read_text())
    return meta["encoder_prefix"]


def load_task_vectors(tv_dir: str | Path, tasks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """τ_t for each task from ``<tv_dir>/<task>.safetensors``."""
    out = {}
    for t in tasks:
        f = Path(tv_dir) / f"{t}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing task vector for task {t!r}; rerun task_vectors")
        out[t] = load_state_dict(f)
    return out


def experts_from_vectors(base: dict, tvs: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """θ_t = θ_0 + τ_t for every task (the experts as the merge methods see them)."""
    return {t: tensors.apply(base, tv, 1.0) for t, tv in tvs.items()}


def task_batches(
    data_root: str | Path, tasks: list[str], split: str, tokenizer, max_length: int, batch_size: int
) -> dict[str, Batches]:
    """Tokenized batches of one split for each task."""
    out = {}
    for t in tasks:
        texts, labels = read_split(Path(data_root) / t, split)
        out[t] = tokenize(tokenizer, texts, labels, max_length=max_length, batch_size=batch_size)
    return out


def label_names(data_dir: str | Path) -> tuple[str, ...]:
    """Label names recorded by the prepare stage."""
    return tuple(read_meta(data_dir)["label_names"])
