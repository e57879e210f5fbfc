"""Batched inference: tokenize once (length-sorted, dynamic padding), then score many weight sets."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergeflow.data.text import Text, split_pairs
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


def encode(tokenizer, texts: Sequence[Text], *, max_length: int, **kwargs: Any):
    """Tokenize inputs the way the model reads them: single texts, or sentence pairs.

    The one tokenization of the project (fine-tuning, learned coefficients, Twin's router
    features, evaluation and the safety audit all call it). A ``(text, text_pair)`` input is
    encoded as the tokenizer encodes a pair, ``tokenizer(text, text_pair)``: for BERT
    ``[CLS] text [SEP] text_pair [SEP]`` with ``token_type_ids`` 0 then 1 (Devlin et al., NAACL
    2019, §3.2), for models without segment embeddings only the separator. Truncation to
    ``max_length`` is ``longest_first``: tokens come off the longer text first, so a short
    first text (a claim, a hypothesis) is kept whole while the long second text (the evidence)
    is cut; ``only_second`` would fail outright whenever the first text alone is too long.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: Strings, or ``(text, text_pair)`` tuples (one kind per call).
        max_length: Truncation length in tokens (special tokens included).
        **kwargs: More tokenizer arguments (``padding``, ``return_tensors``).

    Returns:
        The tokenizer's ``BatchEncoding``.

    Raises:
        DataError: ``texts`` mixes strings and pairs.
    """
    first, second = split_pairs(list(texts))
    if second is None:
        return tokenizer(first, truncation=True, max_length=max_length, **kwargs)
    return tokenizer(first, second, truncation="longest_first", max_length=max_length, **kwargs)


def tokenize(
    tokenizer, texts: Sequence[Text], labels: list[int], *, max_length: int, batch_size: int
) -> Batches:
    """Tokenize (:func:`encode`) and batch a split, sorting by length so padding is minimal.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: Input texts, or ``(text, text_pair)`` pairs.
        labels: Integer labels (same length).
        max_length: Truncation length in tokens.
        batch_size: Examples per batch.

    Returns:
        Reusable batches (order differs from the input; accuracy does not depend on order).
    """
    enc = encode(tokenizer, texts, max_length=max_length)
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
