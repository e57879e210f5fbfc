"""Attack success rate (ASR) of a backdoor and the audit's flagging rule.

ASR = |{x ∈ D_trig : y(x) ≠ t, f(x ⊕ trigger) = t}| / |{x ∈ D_trig : y(x) ≠ t}|, the share of
triggered inputs of a non-target class classified as the target class t (Gu et al., "BadNets",
2017; the metric of the DAM paper, Yang et al., ICLR 2025). Clean accuracy is reported alongside:
a defence must lower ASR without lowering it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def attack_success_rate(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor, target: int
) -> float:
    """Share of examples with true label ≠ ``target`` that are predicted as ``target``.

    Args:
        predictions: Predicted classes on the triggered inputs.
        labels: True classes of those inputs.
        target: The backdoor's target class.

    Returns:
        ASR in [0, 1]; ``nan`` when no example has a non-target label.

    Raises:
        ValueError: The two sequences differ in length.
    """
    p = torch.as_tensor(predictions).long().flatten()
    y = torch.as_tensor(labels).long().flatten()
    if p.shape != y.shape:
        raise ValueError(f"{p.numel()} predictions but {y.numel()} labels")
    keep = y != target
    n = int(keep.sum())
    if n == 0:
        return float("nan")
    return int((p[keep] == target).sum()) / n


def flag_merges(
    asr: Mapping[str, float], threshold: float, exclude: Sequence[str] = ()
) -> dict[str, bool]:
    """``{model: ASR > threshold}`` for every model not in ``exclude`` (NaN never flags)."""
    return {m: bool(a > threshold) for m, a in asr.items() if m not in exclude}
