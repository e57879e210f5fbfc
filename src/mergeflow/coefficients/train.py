"""The optimisation loop shared by AdaMerging, aTLAS and Concrete subspace masks.

One step: build θ(α) (and a sampled Concrete mask), run one minibatch of every task through its
own task model with :func:`torch.func.functional_call`, average the per-task losses, step the
optimiser, project α. Objectives:

- ``entropy``: H(p) = −Σ_c p_c log p_c of the predictions on unlabeled inputs (AdaMerging, Yang
  et al., ICLR 2024, Eq. 6; also aTLAS's entropy TTA variant).
- ``ce``: cross-entropy with the true labels (aTLAS supervised / few-shot, Zhang et al.,
  NeurIPS 2024, Sec. 4–5).
- ``pseudo_label``: cross-entropy against the current model's own argmax predictions on unlabeled
  inputs whose confidence max_c p_c ≥ ``pseudo_threshold`` (aTLAS test-time adaptation by
  self-training; their best TTA variant, UFM, is FixMatch-style pseudo-labelling, which needs
  image augmentations we do not have for text, so this is the un-augmented form).

Concrete masks (Tang et al., "Concrete Subspace Learning based Interference Elimination for
Multi-task Model Fusion", ICLR 2024, Eq. 7–9): a shared mask m ∈ [0,1]^d over every entry of the
task vectors, sampled each step as m = σ((ℓ + log u − log(1−u)) / T), u ~ U(0,1), temperature T;
the merged model is θ = θ_0 + Σ_t α_{t,b} (m ⊙ τ_t). The final mask is binary: m = 1[ℓ > 0].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mergeflow.coefficients.data import Examples, Sampler
from mergeflow.coefficients.functional import (
    CoefficientError,
    FunctionalMerge,
    functional_logits,
)
from mergeflow.tensors import all_finite

OBJECTIVES = ("entropy", "ce", "pseudo_label")


class CoefficientDivergence(CoefficientError):
    """The loss or the coefficients became NaN/Inf; ``last_good`` holds the state before it."""

    def __init__(self, message: str, last_good: dict[str, torch.Tensor], step: int):
        super().__init__(message)
        self.last_good = last_good
        self.step = step


@dataclass(frozen=True)
class LearnSpec:
    """Hyper-parameters of one learned-coefficient run (see ``CoefficientsCfg`` for defaults)."""

    objective: str
    steps: int
    lr: float
    init: float
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    clamp: tuple[float, float] | None = None
    grad_clip: float | None = None
    batch_size: int = 16
    eval_every: int = 0  # 0: no selection (keep the final state)
    seed: int = 0
    train_alpha: bool = True
    concrete: bool = False
    temperature: float = 0.5
    mask_init: float = 3.0
    mask_lr: float = 1e-3
    pseudo_threshold: float = 0.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise CoefficientError(
                f"unknown objective {self.objective!r}; available: {', '.join(OBJECTIVES)}"
            )
        if self.optimizer not in ("adam", "adamw"):
            raise CoefficientError(f"unknown optimizer {self.optimizer!r}; use adam or adamw")
        if not self.train_alpha and not self.concrete:
            raise CoefficientError("nothing to learn: train_alpha is off and no Concrete mask")


@dataclass
class LearnResult:
    """Learned state and its history."""

    alpha: torch.Tensor
    mask: dict[str, torch.Tensor] | None
    losses: list[float]
    selection: list[dict] = field(default_factory=list)
    best_step: int = -1


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy H(softmax(logits)) over the batch."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def task_loss(objective: str, logits: torch.Tensor, labels: torch.Tensor, thr: float):
    """The per-task loss of ``objective`` on one minibatch."""
    if objective == "entropy":
        return entropy(logits)
    if objective == "ce":
        return F.cross_entropy(logits, labels)
    probs = logits.detach().softmax(-1)
    conf, pseudo = probs.max(-1)
    keep = conf >= thr
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], pseudo[keep])


def sample_mask(logits: Mapping[str, torch.Tensor], temperature: float, gen: torch.Generator):
    """A relaxed Bernoulli (Concrete) sample m = σ((ℓ + log u − log(1−u)) / T) per key."""
    out = {}
    for k, lg in logits.items():
        u = torch.rand(lg.shape, generator=gen).clamp_(1e-6, 1 - 1e-6).to(lg.device)
        out[k] = torch.sigmoid((lg + u.log() - (-u).log1p()) / temperature)
    return out


def binary_mask(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deterministic final mask 1[ℓ > 0] (i.e. σ(ℓ) > 0.5)."""
    return {k: (v > 0).float() for k, v in logits.items()}


def _snapshot(alpha: torch.Tensor, mask_logits: Mapping[str, torch.Tensor] | None) -> dict:
    snap = {"alpha": alpha.detach().clone()}
    for k, v in (mask_logits or {}).items():
        snap[f"mask_logits/{k}"] = v.detach().clone()
    return snap


@torch.no_grad()
def accuracies(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    data: Mapping[str, Examples],
    alpha: torch.Tensor,
    mask: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy per task of θ(α) (masked by ``mask``) on ``data``."""
    enc = fm.merged(alpha, mask)
    out = {}
    for t, ex in data.items():
        correct = 0
        for s in range(0, len(ex), batch_size):
            inputs, y = ex.batch(torch.arange(s, min(s + batch_size, len(ex))), fm.device)
            pred = functional_logits(models[t], prefix, enc, inputs).argmax(-1)
            correct += int((pred == y).sum())
        out[t] = correct / len(ex)
    return out


def freeze_task_models(models: Mapping, tasks, seed: int) -> None:
    """Check every task has a model, seed torch, and freeze the models (eval, no grad)."""
    for t in tasks:
        if t not in models:
            raise CoefficientError(f"no task model for task {t!r}")
    torch.manual_seed(seed)
    for m in models.values():
        m.eval()
        m.requires_grad_(False)


def learn(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    train: Mapping[str, Examples],
    spec: LearnSpec,
    select: Mapping[str, Examples] | None = None,
    reference: Mapping[str, float] | None = None,
    alpha0: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> LearnResult:
    """Learn α (and optionally a Concrete mask) by minimising ``spec.objective``.

    Args:
        fm: The functional merge (θ_0, τ, block scheme).
        models: Task → its expert classifier (only its head is used; frozen).
        prefix: The encoder's key prefix inside the task models (``bert``...).
        train: Task → examples the loss is computed on (labels ignored unless ``ce``).
        spec: Hyper-parameters.
        select: Labeled task → examples for best-step selection by mean normalized accuracy
            (evaluated every ``spec.eval_every`` steps, at step 0 and at the end); ``None`` keeps
            the final state.
        reference: Task → expert accuracy on ``select`` (the normalizer); 1.0 if missing.
        alpha0: Initial α (default: filled with ``spec.init``).
        on_step: Called with (step, loss) after every step.
        on_eval: Called with (step, mean normalized accuracy on ``select``) after every
            selection score (so a tracker can chart it while the run goes on).

    Returns:
        The selected α, the binarized mask (Concrete) and the loss / selection history.

    Raises:
        CoefficientDivergence: The loss or a coefficient became non-finite; the error holds the
            last finite state (``last_good``) and the step.
    """
    if not train:
        raise CoefficientError("no training data")
    freeze_task_models(models, train, spec.seed)
    alpha = (alpha0.clone() if alpha0 is not None else fm.full_alpha(spec.init)).to(fm.device)
    alpha.requires_grad_(spec.train_alpha)
    groups = []
    if spec.train_alpha:
        groups.append({"params": [alpha], "lr": spec.lr, "weight_decay": spec.weight_decay})
    mask_logits = None
    if spec.concrete:
        mask_logits = {
            k: torch.full_like(fm.base[k], spec.mask_init).requires_grad_(True) for k in fm.keys
        }
        groups.append({"params": list(mask_logits.values()), "lr": spec.mask_lr, "weight_decay": 0})
    opt_cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(groups)
    sampler = Sampler(dict(train), spec.batch_size, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    params = [p for g in groups for p in g["params"]]

    losses: list[float] = []
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None

    def evaluate(step: int):
        nonlocal best
        if select is None:
            return
        mask = binary_mask(mask_logits) if mask_logits is not None else None
        acc = accuracies(fm, models, prefix, select, alpha.detach(), mask)
        norm = {t: a / ((reference or {}).get(t) or 1.0) for t, a in acc.items()}
        score = sum(norm.values()) / len(norm)
        history.append({"step": step, "mean_normalized": score, "accuracy": acc})
        if on_eval is not None:
            on_eval(step, score)
        if best is None or score > best[0]:
            best = (score, step, _snapshot(alpha, mask_logits))

    if select is not None:
        evaluate(0)
    for step in range(1, spec.steps + 1):
        good = _snapshot(alpha, mask_logits)
        mask = sample_mask(mask_logits, spec.temperature, gen) if mask_logits is not None else None
        enc = fm.merged(alpha, mask)
        loss = 0.0
        for t, ex in train.items():
            inputs, y = ex.batch(sampler.next(t), fm.device)
            logits = functional_logits(models[t], prefix, enc, inputs)
            loss = loss + task_loss(spec.objective, logits, y, spec.pseudo_threshold)
        loss = loss / len(train)
        if not torch.isfinite(loss):
            raise CoefficientDivergence(
                f"loss became {float(loss.detach())} at step {step}; stopped (last good state kept: "
                f"step {step - 1})",
                good,
                step - 1,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        with torch.no_grad():
            if spec.clamp is not None:
                alpha.clamp_(*spec.clamp)
        bad = not all_finite(alpha) or any(
            not all_finite(v) for v in (mask_logits or {}).values()
        )
        if bad:
            raise CoefficientDivergence(
                f"coefficients became NaN/Inf at step {step}; stopped (last good state kept: "
                f"step {step - 1})",
                good,
                step - 1,
            )
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if select is not None and (
            (spec.eval_every and step % spec.eval_every == 0) or step == spec.steps
        ):
            evaluate(step)

    if best is not None:
        _, best_step, snap = best
        alpha_out = snap["alpha"]
        logits = {k[len("mask_logits/") :]: v for k, v in snap.items() if k != "alpha"}
    else:
        best_step, alpha_out = spec.steps, alpha.detach().clone()
        logits = {k: v.detach() for k, v in (mask_logits or {}).items()}
    return LearnResult(
        alpha=alpha_out,
        mask=binary_mask(logits) if mask_logits is not None else None,
        losses=losses,
        selection=history,
        best_step=best_step,
    )
