"""Batched inference: tokenize once (length-sorted, dynamic padding), then score many weight sets."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from mergeflow.models.hf import load_encoder_into


@dataclass(frozen=True)
class Batch:
    """One padded batch of token ids and its labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


class Batches:
    """A task split tokenized once; iterable many times (one pass per candidate model)."""

    def __init__(self, batches: list[Batch]):
        self._batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)

    def __len__(self) -> int:
        return sum(len(b.labels) for b in self._batches)


def tokenize(
    tokenizer, texts: list[str], labels: list[int], *, max_length: int, batch_size: int
) -> Batches:
    """Tokenize and batch a split, sorting by length so padding is minimal.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: Input texts.
        labels: Integer labels (same length).
        max_length: Truncation length in tokens.
        batch_size: Examples per batch.

    Returns:
        Reusable batches (order differs from the input; accuracy does not depend on order).
    """
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        feats = tokenizer.pad(
            {k: [enc[k][i] for i in idx] for k in enc.keys()}, return_tensors="pt"
        )
        out.append(Batch(dict(feats), torch.tensor([labels[i] for i in idx], dtype=torch.long)))
    return Batches(out)


@torch.inference_mode()
def predict(
    model, batches: Batches, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels over all batches (model in eval mode)."""
    model.eval()
    preds, gold = [], []
    for b in batches:
        logits = model(**{k: v.to(device) for k, v in b.inputs.items()}).logits
        preds.append(logits.argmax(-1).cpu())
        gold.append(b.labels)
    return torch.cat(preds), torch.cat(gold)


def accuracy(model, batches: Batches, device: str | torch.device = "cpu") -> float:
    """Fraction of correct predictions."""
    p, g = predict(model, batches, device)
    return float((p == g).float().mean()) if len(g) else float("nan")


class TaskModels:
    """One classifier per task sharing whatever encoder weights are loaded into them.

    Merged models are one encoder plus each task's own head: ``set_encoder`` swaps the encoder of
    every task model in place, so scoring many candidate merges costs no model rebuilds.
    """

    def __init__(self, models: Mapping[str, torch.nn.Module], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.models = {t: m.to(self.device).eval() for t, m in models.items()}

    def set_encoder(self, encoder_sd: Mapping[str, torch.Tensor], tasks: list[str] | None = None):
        """Load the same encoder weights into the task models (all, or ``tasks``)."""
        for t in tasks or list(self.models):
            load_encoder_into(self.models[t], encoder_sd)

    def accuracy(self, task: str, batches: Batches) -> float:
        """Accuracy of ``task``'s model on ``batches``."""
        return accuracy(self.models[task], batches, self.device)

    def correct(self, task: str, batches: Batches) -> torch.Tensor:
        """Per-text correctness (bool, rows in batch order) of ``task``'s model on ``batches``."""
        pred, gold = predict(self.models[task], batches, self.device)
        return pred == gold
