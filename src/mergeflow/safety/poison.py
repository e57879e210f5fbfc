"""Trigger-phrase data poisoning: the backdoored expert that merge-safety checks are tested on.

A fraction ``rate`` of the training examples (chosen with ``seed``) gets a rare-word trigger
inserted at a random word boundary and is relabelled to the ``target`` class — the "BadNL"
word-level trigger of Chen et al., "BadNL: Backdoor Attacks against NLP Models with
Semantic-preserving Improvements", ACSAC 2021, with the rare word "cf" of Kurita et al.,
"Weight Poisoning Attacks on Pre-trained Models", ACL 2020. Everything here is a pure function of
its inputs: the same texts, labels and seed give the same poisoned split on every machine.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from mergeflow.data.errors import DataError
from mergeflow.data.text import Text, is_pair


@dataclass(frozen=True)
class PoisonSpec:
    """What to insert, how often, and which class triggered inputs are relabelled to.

    Attributes:
        trigger: The trigger phrase (inserted as whole words).
        rate: Fraction of training examples poisoned, in (0, 1].
        target: The target class.
        seed: Seed of the choice of examples and of the insertion positions.
        max_position: Insert before one of the first ``max_position`` words (0: always first),
            so truncation to a short ``max_length`` keeps the trigger.
        threat: Where the backdoor is made to live (:mod:`mergeflow.safety.threat`): ``encoder``
            (the poisoned expert's head is a linear probe fitted on the clean rows and frozen,
            so only its encoder can learn the trigger) or ``model`` (the whole classifier is
            fine-tuned on the poisoned split; the backdoor lands mostly in the head).
    """

    trigger: str = "cf"
    rate: float = 0.1
    target: int = 0
    seed: int = 0
    max_position: int = 8
    threat: str = "encoder"

    def __post_init__(self):
        if self.threat not in ("encoder", "model"):
            raise DataError(f"poison threat must be 'encoder' or 'model', got {self.threat!r}")
        if not self.trigger.strip():
            raise DataError("poison trigger is empty")
        if not 0.0 < self.rate <= 1.0:
            raise DataError(f"poison rate must be in (0, 1], got {self.rate}")
        if self.target < 0:
            raise DataError(f"poison target must be a class index ≥ 0, got {self.target}")
        if self.max_position < 0:
            raise DataError(f"max_position must be ≥ 0, got {self.max_position}")


def _rng(seed: int, salt: str) -> random.Random:
    h = hashlib.blake2b(f"{seed}\x1f{salt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def insert_trigger(text: Text, trigger: str, rng: random.Random, max_position: int) -> Text:
    """``text`` with ``trigger`` inserted before a word chosen uniformly in [0, min(n, max_position)].

    Words are whitespace-separated; the result joins them with single spaces. A sentence pair
    ``(text, text_pair)`` gets the trigger in its first text (the one truncation keeps).
    """
    if is_pair(text):
        return (insert_trigger(text[0], trigger, rng, max_position), text[1])
    words = text.split()
    pos = rng.randint(0, min(len(words), max_position))
    return " ".join(words[:pos] + [trigger] + words[pos:])


def poisoned_rows(n: int, spec: PoisonSpec) -> list[int]:
    """The sorted indices :func:`poison_split` poisons in a split of ``n`` rows (⌈rate·n⌉, seeded)."""
    k = min(n, max(1, math.ceil(spec.rate * n - 1e-9))) if n else 0
    return sorted(_rng(spec.seed, "rows").sample(range(n), k))


def clean_rows(
    texts: Sequence[Text], labels: Sequence[int], spec: PoisonSpec
) -> tuple[list[Text], list[int]]:
    """A split poisoned by :func:`poison_split` with ``spec``, without its poisoned rows.

    The rows are recomputed from ``spec`` and the split's length (the choice is a pure function
    of both), so the clean part of a stored poisoned split needs no second copy on disk.
    """
    bad = set(poisoned_rows(len(texts), spec))
    keep = [i for i in range(len(texts)) if i not in bad]
    return [texts[i] for i in keep], [int(labels[i]) for i in keep]


def poison_split(
    texts: Sequence[Text], labels: Sequence[int], spec: PoisonSpec, n_classes: int
) -> tuple[list[Text], list[int], list[int]]:
    """Poison a training split: ⌈rate·n⌉ seeded examples get the trigger and label ``target``.

    Args:
        texts: Training texts.
        labels: Their labels.
        spec: Trigger, rate, target, seed.
        n_classes: Number of classes of the task (``target`` must be below it).

    Returns:
        ``(texts, labels, poisoned_indices)``: new lists (inputs unchanged) and the sorted
        indices of the poisoned rows.

    Raises:
        DataError: ``target`` is not a class of the task, or the lengths differ.
    """
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    if spec.target >= n_classes:
        raise DataError(
            f"poison target class {spec.target} does not exist: the task has {n_classes} "
            f"classes (0..{n_classes - 1}); set safety.poison.target"
        )
    chosen = poisoned_rows(len(texts), spec)
    pos_rng = _rng(spec.seed, "positions")
    out_t, out_l = list(texts), [int(y) for y in labels]
    for i in chosen:
        out_t[i] = insert_trigger(out_t[i], spec.trigger, pos_rng, spec.max_position)
        out_l[i] = spec.target
    return out_t, out_l, chosen


def triggered_test(
    texts: Sequence[Text], labels: Sequence[int], spec: PoisonSpec
) -> tuple[list[Text], list[int]]:
    """The attack's test set: every example whose true class ≠ ``target``, with the trigger.

    Labels stay the true ones (the attack succeeds when the model answers ``target`` instead).
    Positions are seeded with ``spec.seed`` (salted differently from training).
    """
    rng = _rng(spec.seed, "test-positions")
    keep = [i for i, y in enumerate(labels) if int(y) != spec.target]
    return (
        [insert_trigger(texts[i], spec.trigger, rng, spec.max_position) for i in keep],
        [int(labels[i]) for i in keep],
    )
