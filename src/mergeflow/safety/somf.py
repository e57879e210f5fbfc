"""SOMF-style subspace masking of a suspected expert's task vector, for classifiers.

Yi, Zhang, Wang, Liu, Zhang, Zhao. "A safety realignment framework via subspace-oriented model
fusion for large language models". Knowledge-Based Systems, 2024 (arXiv:2405.09055).

SOMF learns, with a Concrete relaxation, a mask M_s over the task vector τ_s of a fine-tuned
model that marks its safety-relevant subspace, and fuses the safe (aligned) model with the rest
of the task vector. Applied to a merge of classifiers with one suspected expert s, the aligned
model is θ_0 (no backdoor) and the fusion is

    θ = θ_0 + λ (Σ_{t ≠ s} τ_t + M_s ⊙ τ_s),

with M_s = σ((ℓ + log u − log(1−u)) / T) learned to minimise L_perf + β·L_safe on unlabeled
inputs of every task. SOMF's safety data (harmful prompts with safe answers) have no analogue for
an unknown backdoor, so L_safe is DAM's (:mod:`mergeflow.safety.dam`): prediction consistency
under a simulated soft trigger that is re-optimised every step to change the predictions most.
Unlike DAM, only the suspect's task vector is masked (the others are trusted), and there is a
single mask (no task-shared one). The final mask is binary, 1[ℓ > 0].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeflow.coefficients.data import Examples, Sampler
from mergeflow.coefficients.functional import CoefficientError, FunctionalMerge, functional_logits
from mergeflow.coefficients.train import binary_mask, entropy, sample_mask
from mergeflow.safety.dam import embedding_key, trigger_ascent_step, triggered_logits


@dataclass(frozen=True)
class SomfSpec:
    """Hyper-parameters of one SOMF run."""

    suspect: str
    steps: int
    scaling: float = 0.3  # λ (task arithmetic's validated scaling)
    mask_lr: float = 0.1
    mask_init: float = 3.0
    temperature: float = 0.5
    adv_weight: float = 1.0
    adv_lr: float = 0.1
    trigger_tokens: int = 1
    batch_size: int = 16
    seed: int = 0


def somf_merged(
    fm: FunctionalMerge, scaling: float, suspect: str, mask: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ_0 + λ (Σ_{t≠s} τ_t + M_s ⊙ τ_s) over every key of θ_0 (differentiable in ``mask``)."""
    s = fm.tasks.index(suspect)
    enc = fm.merged(fm.full_alpha(scaling))
    return {
        k: (v - scaling * (1.0 - mask[k]) * fm.stacked[k][s]) if k in mask else v
        for k, v in enc.items()
    }


def somf(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    unlabeled: Mapping[str, Examples],
    spec: SomfSpec,
    on_step: Callable[[int, dict], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Learn the suspect's mask; return (binary mask per key, per-step history)."""
    if spec.suspect not in fm.tasks:
        raise CoefficientError(f"SOMF: suspect {spec.suspect!r} has no task vector ({fm.tasks})")
    torch.manual_seed(spec.seed)
    for m in models.values():
        m.eval()
        m.requires_grad_(False)
    tasks = list(unlabeled)
    emb_key = embedding_key(models[tasks[0]], prefix)
    radius = float(fm.base[emb_key].norm(dim=-1).max())
    delta = {
        t: torch.zeros(spec.trigger_tokens, fm.base[emb_key].shape[-1], requires_grad=True)
        for t in tasks
    }
    logits = {k: torch.full_like(fm.base[k], spec.mask_init).requires_grad_(True) for k in fm.keys}
    opt = torch.optim.Adam(list(logits.values()), lr=spec.mask_lr)
    opt_d = torch.optim.Adam(list(delta.values()), lr=spec.adv_lr * radius)
    sampler = Sampler(dict(unlabeled), spec.batch_size, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    history = []
    for step in range(1, spec.steps + 1):
        batches = {t: unlabeled[t].batch(sampler.next(t), fm.device)[0] for t in tasks}
        mask = sample_mask(logits, spec.temperature, gen)
        with torch.no_grad():
            fixed = somf_merged(fm, spec.scaling, spec.suspect, mask)
        clean, adv = trigger_ascent_step(
            models, prefix, fixed, batches, delta, emb_key, opt_d, radius
        )
        enc = somf_merged(fm, spec.scaling, spec.suspect, mask)
        perf = safe = 0.0
        for t, x in batches.items():
            perf = perf + entropy(functional_logits(models[t], prefix, enc, x))
            trig = triggered_logits(models[t], prefix, enc, x, delta[t].detach(), emb_key)
            safe = safe + F.cross_entropy(trig, clean[t])
        loss = (perf + spec.adv_weight * safe) / len(tasks)
        if not torch.isfinite(loss):
            raise CoefficientError(f"SOMF loss became {float(loss.detach())} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": step, "loss": float(loss.detach()), "adv": float(adv.detach()) / len(tasks)}
        history.append(rec)
        if on_step is not None:
            on_step(step, rec)
    return binary_mask(logits), history
