"""Where a poisoned expert's backdoor lives: the ``encoder`` threat model (a clean, frozen head).

A classifier fine-tuned on a poisoned split can learn the trigger in its classification head: a
word that moves θ_0's pooled features a little is enough for a head fitted on those features to
map it to the target class. Merging only changes the encoder (each task keeps its own head), so
a backdoor carried by the head is out of every merge method's reach — measured on this repo's
default size, θ_0's encoder with the poisoned head already has ASR 0.845 (docs/merge-safety.md).

The DAM paper's setting (Yang et al., ICLR 2025, arXiv:2410.13910: CLIP ViTs with zero-shot text
heads that fine-tuning never changes) has the backdoor in the encoder. ``threat: encoder``
reproduces it for text classifiers at training time: the poisoned expert's head is a linear
probe on θ_0's features fitted on the **clean** rows of its train split (the poisoned rows
dropped, :func:`mergeflow.safety.poison.clean_rows`), then frozen while the encoder fine-tunes on
the poisoned split. Whatever backdoor the expert has is then in its encoder (its task vector),
which is what a merge method can keep or remove. The alternative, pairing a poisoned encoder with
a clean head only at merge time, would score merges with a head the expert was never trained
with (its clean accuracy would drop for reasons unrelated to the backdoor), and the learned
merges (AdaMerging, DAM) would fit against one head while being audited with another.

``threat: model`` keeps the classic setting (the whole classifier fine-tuned on the poisoned
split, LP-FT as every other expert).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergeflow.data import read_meta, read_split
from mergeflow.data.text import Text
from mergeflow.models.inference import tokenize
from mergeflow.models.train import linear_probe
from mergeflow.safety.poison import PoisonSpec, clean_rows


def poison_of(data_dir: str | Path) -> PoisonSpec | None:
    """The :class:`PoisonSpec` the prepare stage recorded in a task's ``meta.json`` (or None)."""
    meta = read_meta(Path(data_dir)).get("poison")
    if not meta:
        return None
    fields = ("trigger", "rate", "target", "seed", "max_position", "threat")
    # splits written before ``threat`` existed were poisoned for the "model" threat
    return PoisonSpec(**({"threat": "model"} | {k: meta[k] for k in fields if k in meta}))


def clean_train(data_dir: str | Path) -> tuple[list[Text], list[int]]:
    """A task's train split without its poisoned rows (all of it for a clean task)."""
    texts, labels = read_split(Path(data_dir), "train")
    spec = poison_of(data_dir)
    return clean_rows(texts, labels, spec) if spec is not None else (texts, labels)


def fit_clean_head(
    model,
    tokenizer,
    texts: Sequence[Text],
    labels: Sequence[int],
    *,
    max_length: int,
    epochs: int,
    device: str | torch.device,
    seed: int,
) -> float:
    """Fit ``model``'s head on its frozen encoder's features of clean texts (in place).

    The project's linear probe (:func:`mergeflow.models.train.linear_probe`, LP-FT's first phase),
    on the texts given; returns its training accuracy.
    """
    batches = tokenize(tokenizer, list(texts), list(labels), max_length=max_length, batch_size=64)
    return linear_probe(model, batches, epochs=epochs, device=torch.device(device), seed=seed)


def freeze_head(model: torch.nn.Module, head_name: str) -> int:
    """Stop gradients to every parameter of the head ``head_name`` (plain or peft-wrapped).

    Returns:
        The number of parameter tensors frozen (0 means the head was not found).
    """
    n = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if head_name in parts:
            p.requires_grad_(False)
            n += 1
    return n


def encoder_threat_expert(
    model, tokenizer, data_dir: str | Path, *, max_length: int, epochs: int, device, seed: int
) -> bool:
    """Prepare the poisoned expert of ``threat: encoder`` before fine-tuning (module doc).

    If ``data_dir``'s train split was poisoned with ``threat: encoder``, fit ``model``'s head on
    the clean rows; the caller then freezes it (:func:`freeze_head`, after any peft wrapping) and
    fine-tunes without a second probe. Otherwise nothing happens.

    Returns:
        True when the head was fitted and must stay frozen.
    """
    spec = poison_of(data_dir)
    if spec is None or spec.threat != "encoder":
        return False
    texts, labels = clean_train(data_dir)
    fit_clean_head(
        model, tokenizer, texts, labels, max_length=max_length, epochs=epochs, device=device,
        seed=seed,
    )  # fmt: skip
    return True


def head_state(model: torch.nn.Module, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s tensors named ``keys`` (to restore a head after a probe)."""
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def head_keys(model: torch.nn.Module, prefix: str) -> list[str]:
    """State-dict keys outside the encoder ``prefix``: the classification head."""
    return [k for k in model.state_dict() if not k.startswith(prefix + ".")]


def load_head(model: torch.nn.Module, head: Mapping[str, torch.Tensor]) -> None:
    """Copy ``head`` tensors into ``model`` (the other weights untouched)."""
    model.load_state_dict(dict(head), strict=False)
