"""Defense-Aware Merging (DAM): a task-shared and a backdoor-detection mask, learned alternately.

Yang, Tang, Zhu, Chen, Shen, Wu. "Mitigating the Backdoor Effect for Multi-Task Model Merging via
Safety-Aware Subspace". ICLR 2025, arXiv:2410.13910.

The merged encoder lives in the intersection of two subspaces (the paper's Fig. 4):

    θ = θ_0 + Σ_t λ_t (M_b ⊙ M_s ⊙ τ_t),

with M_s the **task-shared** mask (keeps the parameters that help every task, as Concrete
subspace learning does: Tang et al., ICLR 2024) and M_b the **backdoor-detection** mask (drops the
parameters that carry a trigger's effect). Both are relaxed Bernoulli (Concrete) masks
M = σ((ℓ + log u − log(1−u)) / T) over every entry of the task vectors, learned from unlabeled
test inputs only (the defender knows neither the trigger nor which expert is poisoned), with the
objective L_total = L_perf + β·L_safe optimized alternately:

1. (meta-learning inner step, ``over="adamerging"`` only) with both masks detached, one
   entropy step on λ from its initial value: λ' = Π_[0,1](λ_0 − η·sign(∇_λ L_perf)) — the
   first Adam step of the official code, which re-initialises λ every outer step;
   ``over="task_arithmetic"``: λ' = λ_0 (task arithmetic's validated scaling).
2. (trigger simulation) the defender does not know the trigger, so a worst-case one is found
   for the current merge: a soft trigger δ_t (``trigger_tokens`` learned embedding vectors per
   task, inserted after the first token, each projected onto the ball of the largest token
   embedding norm) takes one ascent step on L_adv = Σ_t CE(f_t(x ⊕ δ_t; θ), ŷ_t(x)), with
   ŷ_t(x) = argmax f_t(x; θ) the clean prediction (the official code optimises an additive image
   perturbation the same way; for text the analogue of an inserted trigger word is an inserted
   embedding).
3. (alternating mask steps) odd steps update M_s on L_perf = Σ_t H(f_t(x; θ)) (prediction
   entropy, as AdaMerging / Concrete); even steps update M_b on L_perf + β·L_safe with
   L_safe = Σ_t CE(f_t(x ⊕ δ_t; θ), ŷ_t(x)): the merge must answer the same with and without the
   simulated trigger. (The official code minimises the entropy of the perturbed predictions
   instead; a backdoored model is confidently wrong on triggered inputs, so we use the
   consistency form, which the paper's "safety" loss describes.)

The final masks are binary, 1[ℓ_s > 0]·1[ℓ_b > 0] (the repo's Concrete convention; the official
code evaluates a continuous mask rescaled by its mean), stored as one shared mask so
:func:`mergeflow.coefficients.rebuild` re-applies DAM like any learned merge.

θ(λ, M) is built with :class:`~mergeflow.coefficients.FunctionalMerge` and every forward goes
through :func:`torch.func.functional_call`, so gradients reach only the mask logits, δ and (inner
step) λ; the task models are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mergeflow.coefficients.data import Examples, Sampler
from mergeflow.coefficients.functional import CoefficientError, FunctionalMerge, functional_logits
from mergeflow.coefficients.train import (
    CoefficientDivergence,
    LearnResult,
    binary_mask,
    entropy,
    freeze_task_models,
    sample_mask,
)
from mergeflow.tensors import all_finite


@dataclass(frozen=True)
class DamSpec:
    """Hyper-parameters of one DAM run (defaults: the official configuration where it applies)."""

    steps: int
    over: str = "task_arithmetic"  # task_arithmetic: λ fixed; adamerging: meta inner step on λ
    init: float = 0.3  # λ_0 (task-wise)
    lr: float = 1e-3  # η of the inner λ step
    mask_lr: float = 0.1
    mask_init: float = 3.0
    temperature: float = 0.5
    adv_weight: float = 0.1  # β
    adv_lr: float = 0.1  # step of the simulated trigger (relative to the embedding-norm radius)
    trigger_tokens: int = 1
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.over not in ("task_arithmetic", "adamerging"):
            raise CoefficientError(
                f"DAM goes over task_arithmetic or adamerging, not {self.over!r}"
            )
        if self.steps < 1 or self.trigger_tokens < 1:
            raise CoefficientError("DAM needs steps ≥ 1 and trigger_tokens ≥ 1")


@dataclass
class DamResult(LearnResult):
    """A :class:`LearnResult` (α, combined binary mask, losses) plus DAM's own diagnostics."""

    shared_density: float = 1.0
    detection_density: float = 1.0
    history: list[dict] = field(default_factory=list)


def embedding_key(model: torch.nn.Module, prefix: str) -> str:
    """The encoder key of the input word-embedding matrix (e.g. ``embeddings.word_embeddings.weight``)."""
    emb = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if mod is emb and name.startswith(prefix + "."):
            return name[len(prefix) + 1 :] + ".weight"
    raise CoefficientError(f"cannot locate the input embeddings under prefix {prefix!r}")


def triggered_logits(
    model: torch.nn.Module,
    prefix: str,
    encoder: Mapping[str, torch.Tensor],
    inputs: dict,
    delta: torch.Tensor,
    emb_key: str,
) -> torch.Tensor:
    """Logits with the soft trigger ``delta`` (k × h) inserted after the first token.

    The word embeddings are looked up in ``encoder`` (so they follow θ), ``delta`` is spliced in
    at position 1 and the model runs on ``inputs_embeds`` through ``functional_call``.
    """
    ids = inputs["input_ids"]
    b, k = ids.shape[0], delta.shape[0]
    emb = F.embedding(ids, encoder[emb_key])
    x = torch.cat([emb[:, :1], delta.unsqueeze(0).expand(b, -1, -1), emb[:, 1:]], dim=1)
    kw = {"inputs_embeds": x}
    am = inputs.get("attention_mask")
    if am is not None:
        kw["attention_mask"] = torch.cat([am[:, :1], am.new_ones(b, k), am[:, 1:]], dim=1)
    tt = inputs.get("token_type_ids")
    if tt is not None:
        kw["token_type_ids"] = torch.cat([tt[:, :1], tt.new_zeros(b, k), tt[:, 1:]], dim=1)
    params = {f"{prefix}.{key}": v for key, v in encoder.items()}
    return torch.func.functional_call(model, params, args=(), kwargs=kw, strict=False).logits


def _project(delta: torch.Tensor, radius: float) -> None:
    with torch.no_grad():
        n = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        delta.mul_(torch.clamp(radius / n, max=1.0))


def trigger_ascent_step(
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    enc_fixed: Mapping[str, torch.Tensor],
    batches: Mapping[str, dict],
    delta: Mapping[str, torch.Tensor],
    emb_key: str,
    opt: torch.optim.Optimizer,
    radius: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One ascent step of the simulated trigger δ on frozen merged weights.

    Maximises Σ_t CE(f_t(x ⊕ δ_t; θ_fixed), ŷ_t) with ŷ_t = argmax f_t(x; θ_fixed) (the clean
    prediction), then projects δ_t back onto the ball of ``radius``.

    Returns:
        The clean predictions ŷ_t per task and the (detached) adversarial loss.
    """
    with torch.no_grad():
        clean = {
            t: functional_logits(models[t], prefix, enc_fixed, x).argmax(-1)
            for t, x in batches.items()
        }
    adv = sum(
        F.cross_entropy(
            triggered_logits(models[t], prefix, enc_fixed, x, delta[t], emb_key), clean[t]
        )
        for t, x in batches.items()
    )
    opt.zero_grad(set_to_none=True)
    (-adv).backward()
    opt.step()
    for d in delta.values():
        _project(d, radius)
    return clean, adv.detach()


def combined(
    shared: Mapping[str, torch.Tensor], detection: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """M = M_b ⊙ M_s per key."""
    return {k: shared[k] * detection[k] for k in shared}


def dam(
    fm: FunctionalMerge,
    models: Mapping[str, torch.nn.Module],
    prefix: str,
    unlabeled: Mapping[str, Examples],
    spec: DamSpec,
    on_step: Callable[[int, dict], None] | None = None,
) -> DamResult:
    """Learn DAM's dual masks (and, over AdaMerging, λ) on unlabeled inputs of every task.

    Args:
        fm: The functional merge over θ_0 and every task vector; ``task`` block scheme.
        models: Task → expert classifier (only its head is used; frozen).
        prefix: Encoder prefix inside the task models.
        unlabeled: Task → inputs (labels never read).
        spec: Hyper-parameters.
        on_step: Called with (step, {losses}) after every step.

    Returns:
        :class:`DamResult` with α (T × 1), the combined binary mask and per-step losses.

    Raises:
        CoefficientDivergence: A loss or a mask logit became non-finite.
    """
    if fm.scheme.kind != "task":
        raise CoefficientError("DAM learns one λ per task: use the task block scheme")
    freeze_task_models(models, unlabeled, spec.seed)
    first = models[next(iter(unlabeled))]
    emb_key = embedding_key(first, prefix)
    if emb_key not in fm.base:
        raise CoefficientError(f"encoder has no {emb_key!r}")
    radius = float(fm.base[emb_key].norm(dim=-1).max())
    hidden = fm.base[emb_key].shape[-1]
    tasks = list(unlabeled)
    delta = {
        t: torch.zeros(spec.trigger_tokens, hidden, device=fm.device, requires_grad=True)
        for t in tasks
    }
    logits_s = {
        k: torch.full_like(fm.base[k], spec.mask_init).requires_grad_(True) for k in fm.keys
    }
    logits_b = {
        k: torch.full_like(fm.base[k], spec.mask_init).requires_grad_(True) for k in fm.keys
    }
    opt_s = torch.optim.Adam(list(logits_s.values()), lr=spec.mask_lr)
    opt_b = torch.optim.Adam(list(logits_b.values()), lr=spec.mask_lr)
    opt_d = torch.optim.Adam(list(delta.values()), lr=spec.adv_lr * radius)
    alpha0 = fm.full_alpha(spec.init)
    sampler = Sampler(dict(unlabeled), spec.batch_size, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed + 1)

    def inner_alpha(mask: Mapping[str, torch.Tensor], batches: dict) -> torch.Tensor:
        if spec.over == "task_arithmetic":
            return alpha0
        a = alpha0.clone().requires_grad_(True)
        enc = fm.merged(a, {k: v.detach() for k, v in mask.items()})
        loss = sum(
            entropy(functional_logits(models[t], prefix, enc, x)) for t, x in batches.items()
        )
        (g,) = torch.autograd.grad(loss, a)
        return (alpha0 - spec.lr * g.sign()).clamp(0.0, 1.0).detach()

    losses: list[float] = []
    history: list[dict] = []
    for step in range(1, spec.steps + 1):
        batches = {t: unlabeled[t].batch(sampler.next(t), fm.device)[0] for t in tasks}
        ms, mb = (
            sample_mask(logits_s, spec.temperature, gen),
            sample_mask(logits_b, spec.temperature, gen),
        )
        mask = combined(ms, mb)
        alpha = inner_alpha(mask, batches)
        # (2) simulated trigger: one ascent step on the prediction change, weights detached.
        with torch.no_grad():
            enc_fixed = fm.merged(alpha, {k: v.detach() for k, v in mask.items()})
        clean_pred, adv = trigger_ascent_step(
            models, prefix, enc_fixed, batches, delta, emb_key, opt_d, radius
        )
        del enc_fixed
        # (3) alternating mask step.
        detect_step = step % 2 == 0
        enc = fm.merged(alpha, mask)
        perf = safe = 0.0
        for t, x in batches.items():
            logits = functional_logits(models[t], prefix, enc, x)
            perf = perf + entropy(logits)
            if detect_step:
                trig = triggered_logits(models[t], prefix, enc, x, delta[t].detach(), emb_key)
                safe = safe + F.cross_entropy(trig, clean_pred[t])
        loss = (perf + spec.adv_weight * safe) / len(tasks)
        if not torch.isfinite(loss):
            raise CoefficientDivergence(
                f"DAM loss became {float(loss.detach())} at step {step}",
                {"alpha": alpha.detach().clone()},
                step - 1,
            )
        opt = opt_b if detect_step else opt_s
        opt_s.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bad = any(
            not all_finite(v) for v in (*logits_s.values(), *logits_b.values())
        )
        if bad:
            raise CoefficientDivergence(
                f"DAM mask logits became NaN/Inf at step {step}",
                {"alpha": alpha.detach().clone()},
                step - 1,
            )
        rec = {
            "step": step,
            "updated": "detection" if detect_step else "shared",
            "loss": float(loss.detach()),
            "perf": float(perf.detach()) / len(tasks),
            "adv": float(adv.detach()) / len(tasks),
            "safe": float(safe.detach()) / len(tasks) if detect_step else None,
        }
        losses.append(rec["loss"])
        history.append(rec)
        if on_step is not None:
            on_step(step, rec)

    final_s, final_b = binary_mask(logits_s), binary_mask(logits_b)
    final = combined(final_s, final_b)
    if spec.over == "adamerging":
        batches = {t: unlabeled[t].batch(sampler.next(t), fm.device)[0] for t in tasks}
        alpha_out = inner_alpha(final, batches)
    else:
        alpha_out = alpha0.clone()

    def density(m: Mapping[str, torch.Tensor]) -> float:
        return sum(float(v.sum()) for v in m.values()) / sum(v.numel() for v in m.values())

    return DamResult(
        alpha=alpha_out,
        mask=final,
        losses=losses,
        best_step=spec.steps,
        shared_density=density(final_s),
        detection_density=density(final_b),
        history=history,
    )
