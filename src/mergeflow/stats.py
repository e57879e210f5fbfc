"""Uncertainty of test accuracies: Wilson intervals and paired bootstrap intervals of differences.

Every accuracy the pipeline reports is a proportion of ``n`` test texts, so it carries a 95 %
Wilson score interval (E. B. Wilson, "Probable Inference, the Law of Succession, and Statistical
Inference", JASA 1927), which, unlike the normal approximation ``p ± 1.96·sqrt(p(1−p)/n)``, stays
inside [0, 1] and keeps its coverage near p = 0 or 1.

Two methods scored on the **same** test texts are compared by a paired bootstrap (B. Efron,
R. Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13; for NLP: T. Berg-Kirkpatrick,
D. Burkett, D. Klein, "An Empirical Investigation of Statistical Significance in NLP",
EMNLP 2012): texts are resampled with replacement within each task, and the 2.5 / 97.5 %
percentiles of the resampled difference in (mean) accuracy form the interval. A difference whose
interval contains 0 is "within noise".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``correct / n``.

    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``.

    Args:
        correct: Number of successes (0 <= correct <= n).
        n: Number of trials.
        z: Normal quantile (1.96 for 95 %).

    Returns:
        ``(lo, hi)``; ``(0.0, 1.0)`` when ``n == 0``.

    Raises:
        ValueError: If ``correct`` is outside ``[0, n]``.
    """
    if not 0 <= correct <= n:
        raise ValueError(f"wilson: correct={correct} outside [0, n={n}]")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap replicates of every row's mean accuracy, all rows resampled with the same texts.

    Attributes:
        rows: Row (method) names, the column order of the tensors.
        mean_accuracy: ``[samples, rows]``: mean over tasks of each replicate's accuracy.
        mean_normalized: ``[samples, rows]``: mean over tasks of accuracy ÷ the reference row's
            accuracy in the same replicate (None without a reference row).
    """

    rows: tuple[str, ...]
    mean_accuracy: torch.Tensor
    mean_normalized: torch.Tensor | None

    def interval(self, row: str, normalized: bool = False) -> list[float]:
        """95 % percentile interval of a row's mean (normalized) accuracy."""
        reps = self.mean_normalized if normalized else self.mean_accuracy
        return percentile_interval(reps[:, self.rows.index(row)])

    def paired(self, a: str, b: str, normalized: bool = True) -> dict:
        """Interval of ``mean(a) − mean(b)``; ``within_noise`` when it contains 0."""
        reps = self.mean_normalized if normalized else self.mean_accuracy
        d = reps[:, self.rows.index(a)] - reps[:, self.rows.index(b)]
        lo, hi = percentile_interval(d)
        return {"ci": [lo, hi], "within_noise": lo <= 0.0 <= hi}


def percentile_interval(reps: torch.Tensor) -> list[float]:
    """The 2.5 % and 97.5 % percentiles of bootstrap replicates."""
    q = torch.quantile(reps.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def bootstrap(
    correct: Mapping[str, Mapping[str, Sequence[bool] | torch.Tensor]],
    *,
    reference: str | None = None,
    samples: int = 2000,
    seed: int = 0,
) -> Bootstrap:
    """Paired bootstrap of every row's mean (normalized) accuracy over shared test texts.

    Each replicate draws, for every task, ``n_t`` texts with replacement (the same draw for every
    row: the pairing), recomputes every row's per-task accuracy, divides by the ``reference``
    row's accuracy in the same replicate (normalized accuracy = merged ÷ expert, so the
    expert's own noise is part of the interval) and averages over tasks.

    Args:
        correct: Row -> task -> per-text correctness (0/1), every row in the same text order.
        reference: Row to normalize by (e.g. ``"expert"``), or None.
        samples: Replicates.
        seed: Seed of the draws (same inputs and seed, same replicates).

    Returns:
        The replicates (:class:`Bootstrap`).

    Raises:
        ValueError: Rows with different tasks or text counts, or an unknown reference.
    """
    rows = tuple(correct)
    if not rows:
        raise ValueError("bootstrap: no rows")
    tasks = sorted(correct[rows[0]])
    for r in rows:
        if sorted(correct[r]) != tasks:
            raise ValueError(f"bootstrap: row {r!r} has tasks {sorted(correct[r])}, not {tasks}")
    if reference is not None and reference not in rows:
        raise ValueError(f"bootstrap: reference row {reference!r} not among {list(rows)}")
    gen = torch.Generator().manual_seed(seed)
    acc_sum = torch.zeros(samples, len(rows), dtype=torch.float64)
    norm_sum = torch.zeros_like(acc_sum) if reference is not None else None
    for t in tasks:
        cols = [torch.as_tensor(correct[r][t]).flatten().double() for r in rows]
        if len({c.numel() for c in cols}) != 1:
            raise ValueError(f"bootstrap: rows differ in the number of texts of task {t!r}")
        x = torch.stack(cols)
        n = x.shape[1]
        if n == 0:
            raise ValueError(f"bootstrap: task {t!r} has no test texts")
        idx = torch.randint(0, n, (samples, n), generator=gen)
        counts = torch.zeros(samples, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(samples, n, dtype=torch.float64)
        )
        acc = counts @ x.T / n  # [samples, rows]
        acc_sum += acc
        if norm_sum is not None:
            ref = acc[:, rows.index(reference)].unsqueeze(1)
            norm_sum += torch.where(ref > 0, acc / ref.clamp_min(1e-12), torch.nan)
    k = len(tasks)
    return Bootstrap(rows, acc_sum / k, None if norm_sum is None else norm_sum / k)


def paired_bootstrap(
    a: Mapping[str, Sequence[bool] | torch.Tensor],
    b: Mapping[str, Sequence[bool] | torch.Tensor],
    *,
    samples: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap interval of ``mean_t acc_a(t) − mean_t acc_b(t)`` over shared test texts.

    Args:
        a: Task -> per-text correctness (0/1) of method A, in a fixed text order.
        b: Task -> per-text correctness of method B, same tasks and order.
        samples: Bootstrap replicates.
        seed: Seed of the resampling (same seed, same interval).

    Returns:
        ``{"diff": observed, "ci": [lo, hi], "within_noise": lo <= 0 <= hi}``.
    """
    boot = bootstrap({"a": a, "b": b}, samples=samples, seed=seed)
    diff = sum(
        float(torch.as_tensor(a[t]).double().mean() - torch.as_tensor(b[t]).double().mean())
        for t in a
    ) / len(a)
    return {"diff": diff, **boot.paired("a", "b", normalized=False)}
