"""The data learned merging consumes: tokenized splits, seeded stratified k-shot subsets, minibatches.

Every subset is described by a :class:`DataUse` record (task, split, k, seed, n, labels used or not)
that the pipeline logs to MLflow, so each learned model says exactly which examples shaped it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergeflow.coefficients.functional import CoefficientError
from mergeflow.data.text import Text
from mergeflow.models.inference import encode


@dataclass(frozen=True)
class DataUse:
    """What one run consumed of one task."""

    task: str
    split: str
    n: int
    k: int | None
    seed: int | None
    labels_used: bool

    def as_dict(self) -> dict:
        """Plain dict (for JSON / MLflow)."""
        return asdict(self)


class Examples:
    """A tokenized split held as padded tensors; minibatches are trimmed to their longest row.

    Texts may be ``(text, text_pair)`` pairs: they are encoded as pairs
    (:func:`mergeflow.models.inference.encode`, with ``token_type_ids`` where the model has them).
    """

    def __init__(self, tokenizer, texts: Sequence[Text], labels: Sequence[int], max_length: int):
        if not texts:
            raise CoefficientError("empty split: nothing to learn coefficients from")
        enc = encode(tokenizer, texts, max_length=max_length, padding=True, return_tensors="pt")
        self.inputs = dict(enc)
        self.labels = torch.tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[dict, torch.Tensor]:
        """Rows ``idx`` (inputs trimmed to the longest row) and their labels."""
        am = self.inputs["attention_mask"][idx]
        width = max(int(am.sum(1).max()), 1)
        inputs = {k: v[idx, :width].to(device) for k, v in self.inputs.items()}
        return inputs, self.labels[idx].to(device)

    def unlabeled(self) -> Examples:
        """The same inputs with every label replaced by -1 (test-time methods never see labels)."""
        out = self.subset(range(len(self)))
        out.labels = torch.full_like(self.labels, -1)
        return out

    def subset(self, idx: Sequence[int]) -> Examples:
        """A new :class:`Examples` holding only rows ``idx``."""
        out = object.__new__(Examples)
        ix = torch.tensor(list(idx), dtype=torch.long)
        out.inputs = {k: v[ix] for k, v in self.inputs.items()}
        out.labels = self.labels[ix]
        return out


def few_shot_indices(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Seeded, stratified k-shot subset: ``k`` examples of every class present (aTLAS few-shot).

    Args:
        labels: Labels of the split to draw from.
        k: Examples per class (≥ 1).
        seed: Random seed; the same labels and seed always give the same indices.

    Returns:
        Sorted indices into ``labels``.

    Raises:
        CoefficientError: ``k`` < 1, or a class has fewer than ``k`` examples.
    """
    if k < 1:
        raise CoefficientError(f"k must be ≥ 1, got {k}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    short = {c: len(ix) for c, ix in by_class.items() if len(ix) < k}
    if short:
        raise CoefficientError(
            f"k={k} examples per class is more than the split holds for class(es) "
            f"{sorted(short.items())} (class: count); lower k or enlarge the split"
        )
    rng = random.Random(seed)
    out = []
    for c in sorted(by_class):
        out.extend(rng.sample(by_class[c], k))
    return sorted(out)


def load_examples(data_root: Path, task: str, split: str, tokenizer, max_length: int) -> Examples:
    """Tokenize ``split`` of ``task``; a missing or empty split is a clear error."""
    from mergeflow.data import DataError, read_split

    f = Path(data_root) / task / f"{split}.jsonl"
    if not f.is_file():
        raise CoefficientError(
            f"task {task!r} has no {split!r} split ({f} missing); learned merging needs it"
        )
    try:
        texts, labels = read_split(Path(data_root) / task, split)
    except DataError as err:
        raise CoefficientError(f"task {task!r}: cannot read split {split!r}: {err}") from None
    if not texts:
        raise CoefficientError(f"task {task!r}: split {split!r} is empty")
    return Examples(tokenizer, texts, labels, max_length)


class Sampler:
    """Seeded minibatches per task: reshuffled epochs, the same sequence for the same seed."""

    def __init__(self, data: dict[str, Examples], batch_size: int, seed: int):
        self.data = data
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._order: dict[str, list[int]] = {t: [] for t in data}

    def next(self, task: str) -> torch.Tensor:
        """Indices of the next minibatch of ``task``."""
        n = len(self.data[task])
        order = self._order[task]
        while len(order) < min(self.batch_size, n):
            order.extend(torch.randperm(n, generator=self.gen).tolist())
        take, self._order[task] = order[: self.batch_size], order[self.batch_size :]
        return torch.tensor(take, dtype=torch.long)
