"""AdaMerging, aTLAS and Concrete subspace masks as thin presets over :func:`learn`.

Each function fixes the paper's objective and defaults and returns a :class:`LearnResult`; the
functional model (θ_0, τ, block scheme) and the data come from the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from mergeflow.coefficients.data import Examples
from mergeflow.coefficients.functional import CoefficientError, FunctionalMerge
from mergeflow.coefficients.train import LearnResult, LearnSpec, learn


def adamerging(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    unlabeled: Mapping[str, Examples],
    *,
    steps: int,
    lr: float = 1e-3,
    init: float = 0.3,
    batch_size: int = 16,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> LearnResult:
    """AdaMerging: test-time entropy minimisation of merging coefficients.

    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    Minimises the prediction entropy on unlabeled test inputs of every task (Eq. 6),
    min_λ Σ_t E_{x∈D_t^test} H(f_t(x; θ_0 + Σ_k λ_k τ_k)), with λ per task (task-wise, Eq. 3)
    or per task and tensor (layer-wise, Eq. 4) — set by ``fm.scheme``. λ starts at 0.3, is
    projected to [0, 1] after every Adam step; the final λ is kept (no labels are used).
    """
    if fm.scheme.kind not in ("task", "layer"):
        raise CoefficientError(f"AdaMerging is task- or layer-wise, not {fm.scheme.kind!r}")
    spec = LearnSpec(
        objective="entropy",
        steps=steps,
        lr=lr,
        init=init,
        optimizer="adam",
        clamp=(0.0, 1.0),
        batch_size=batch_size,
        seed=seed,
    )
    return learn(fm, models, prefix, unlabeled, spec, on_step=on_step)


def atlas(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    train: Mapping[str, Examples],
    *,
    objective: str = "ce",
    steps: int,
    select: Mapping[str, Examples] | None = None,
    reference: Mapping[str, float] | None = None,
    eval_every: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    init: float = 0.0,
    batch_size: int = 16,
    pseudo_threshold: float = 0.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> LearnResult:
    """Learned anisotropic scaling of task vectors (aTLAS).

    Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
    NeurIPS 2024.
    θ = θ_0 + Σ_t Λ_t τ_t with Λ_t block-diagonal: one learned scale per parameter block
    (Eq. 2; ``fm.scheme`` = ``layer``, or ``atlas`` for K random partitions per tensor, aTLAS×K).
    Supervised / few-shot: cross-entropy on labeled examples; test-time: ``pseudo_label``
    (self-training on the model's own confident predictions) or ``entropy``. Paper defaults:
    coefficients start at 0, AdamW lr 1e-3, weight decay 0.1, gradient-norm clipping 1.0, the
    best evaluation step by mean normalized accuracy on ``select``.
    """
    spec = LearnSpec(
        objective=objective,
        steps=steps,
        lr=lr,
        init=init,
        optimizer="adamw",
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        batch_size=batch_size,
        eval_every=eval_every,
        pseudo_threshold=pseudo_threshold,
        seed=seed,
    )
    return learn(
        fm, models, prefix, train, spec, select=select, reference=reference,
        on_step=on_step, on_eval=on_eval,
    )


def concrete(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    unlabeled: Mapping[str, Examples],
    *,
    over: str = "task_arithmetic",
    scaling: float = 0.3,
    steps: int,
    temperature: float = 0.5,
    mask_init: float = 3.0,
    mask_lr: float = 0.1,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> LearnResult:
    """Concrete subspace masks over task arithmetic or AdaMerging.

    Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model
    Fusion", ICLR 2024.
    A mask m shared by all task vectors is learned through its Concrete relaxation
    m = σ((ℓ + log u − log(1−u)) / T), T = ``temperature``, by minimising the entropy on unlabeled
    test inputs (Eq. 9), with θ = θ_0 + λ Σ_t m ⊙ τ_t (``over="task_arithmetic"``: λ fixed, task
    scheme) or θ = θ_0 + Σ_t λ_t^l (m ⊙ τ_t^l) (``over="adamerging"``: λ learned jointly, layer
    scheme, init 0.3, clamp [0, 1]). The returned mask is binary, 1[ℓ > 0].
    """
    if over == "task_arithmetic":
        if fm.scheme.kind != "task":
            raise CoefficientError("Concrete task arithmetic uses the task scheme (one λ)")
        train_alpha, init, clamp = False, scaling, None
    elif over == "adamerging":
        if fm.scheme.kind != "layer":
            raise CoefficientError("Concrete AdaMerging uses the layer scheme")
        train_alpha, init, clamp = True, 0.3, (0.0, 1.0)
    else:
        raise CoefficientError(f"Concrete masks go on task_arithmetic or adamerging, not {over!r}")
    spec = LearnSpec(
        objective="entropy",
        steps=steps,
        lr=lr,
        init=init,
        optimizer="adam",
        clamp=clamp,
        batch_size=batch_size,
        seed=seed,
        train_alpha=train_alpha,
        concrete=True,
        temperature=temperature,
        mask_init=mask_init,
        mask_lr=mask_lr,
    )
    return learn(fm, models, prefix, unlabeled, spec, on_step=on_step)
