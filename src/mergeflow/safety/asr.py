"""Attack success rate (ASR) of a backdoor and the audit's flagging rule.

ASR = |{x ∈ D_trig : y(x) ≠ t, f(x ⊕ trigger) = t}| / |{x ∈ D_trig : y(x) ≠ t}|, the share of
triggered inputs of a non-target class classified as the target class t (Gu et al., "BadNets",
2017; the metric of the DAM paper, Yang et al., ICLR 2025). Clean accuracy is reported alongside:
a defence must lower ASR without lowering it.

:func:`backdoor_split` says where a model's backdoor lives: ASR under the task's own head,
under a head fitted on clean data over the same encoder, and under θ_0's clean head, each with
its 95 % Wilson interval (:func:`mergeflow.stats.wilson`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeflow.stats import wilson


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


def asr_counts(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor, target: int
) -> tuple[int, int]:
    """``(k, n)``: triggered inputs of a non-target class predicted ``target``, and how many."""
    p = torch.as_tensor(predictions).long().flatten()
    y = torch.as_tensor(labels).long().flatten()
    if p.shape != y.shape:
        raise ValueError(f"{p.numel()} predictions but {y.numel()} labels")
    keep = y != target
    return int((p[keep] == target).sum()), int(keep.sum())


def _rate(k: int, n: int) -> dict:
    return {"asr": k / n if n else float("nan"), "ci": list(wilson(k, n)), "k": k, "n": n}


def backdoor_split(
    own: tuple[int, int], clean_head: tuple[int, int], base_head: tuple[int, int], reference: float
) -> dict:
    """Where one model's backdoor lives: its head's share and its encoder's share of the ASR.

    With the same encoder, ASR(own head) − ASR(head fitted on clean data) is what the task's
    head adds (the **head's share**); ASR(clean head) − ``reference`` is what the encoder makes
    a clean head do beyond the trigger word's natural effect (the **encoder's share**), with
    ``reference`` the ASR of θ_0 under its own clean head. The two shares add up to
    ASR(own) − ``reference``. ASR under θ_0's clean head (fitted on θ_0, not on this encoder)
    shows whether the encoder's backdoor also reaches a head that never saw it.

    Args:
        own: ``(k, n)`` under the task's own head (:func:`asr_counts`).
        clean_head: ``(k, n)`` under a linear probe fitted on clean train texts over this encoder.
        base_head: ``(k, n)`` under the linear probe fitted on clean train texts over θ_0.
        reference: ASR of θ_0 under that θ_0 probe.

    Returns:
        ``{"own"|"clean_head"|"base_head": {"asr", "ci", "k", "n"}, "head_share",
        "encoder_share"}`` (intervals: 95 % Wilson).
    """
    out = {"own": _rate(*own), "clean_head": _rate(*clean_head), "base_head": _rate(*base_head)}
    out["head_share"] = out["own"]["asr"] - out["clean_head"]["asr"]
    out["encoder_share"] = out["clean_head"]["asr"] - reference
    return out


def flag_merges(
    asr: Mapping[str, float], threshold: float, exclude: Sequence[str] = ()
) -> dict[str, bool]:
    """``{model: ASR > threshold}`` for every model not in ``exclude`` (NaN never flags)."""
    return {m: bool(a > threshold) for m, a in asr.items() if m not in exclude}
