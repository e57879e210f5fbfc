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

For text, ``trigger="token"`` (the pipeline's default) replaces the soft trigger by a discrete
search: :func:`find_triggers` looks for single words that flip a task's predictions (gradient
candidates and the most-changed rows of each expert's τ on the word embeddings) and the safety
loss uses the word found. **Quarantine** is a separate defence with its own switch
(``quarantine``, off by default): trigger words rare in the clean texts get their embedding rows
replaced by the unknown token's — an input filter, not part of DAM's masks; it removes a backdoor
kept by a poisoned expert's own classification head, which masks on τ cannot reach
(docs/merge-safety.md). :attr:`DamResult.flipped` reports the share of mask entries DAM turned off.

The final masks are binary, 1[ℓ_s > 0]·1[ℓ_b > 0] (the repo's Concrete convention; the official
code evaluates a continuous mask rescaled by its mean), stored as one shared mask so
:func:`mergeflow.coefficients.rebuild` re-applies DAM like any learned merge.

θ(λ, M) is built with :class:`~mergeflow.coefficients.FunctionalMerge` and every forward goes
through :func:`torch.func.functional_call`, so gradients reach only the mask logits, δ and (inner
step) λ; the task models are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    # trigger simulation: "soft" (a learned embedding, the paper's continuous perturbation) or
    # "token" (discrete inversion: the vocabulary word whose insertion flips the most inputs)
    trigger: str = "soft"
    candidates: int = 16  # "token": words per task and source (gradient; τ rows) tried exactly
    flip_threshold: float = 0.9  # "token": a word is a trigger iff it flips ≥ this of a task
    probe_size: int = 32  # "token": unlabeled inputs per task used for the inversion
    max_frequency: float = 0.01  # "token": quarantine a trigger in ≤ this of the clean texts
    # the separate quarantine defence ("token" only): off, DAM is its masks alone
    quarantine: bool = False

    def __post_init__(self):
        if self.over not in ("task_arithmetic", "adamerging"):
            raise CoefficientError(
                f"DAM goes over task_arithmetic or adamerging, not {self.over!r}"
            )
        if self.steps < 1 or self.trigger_tokens < 1:
            raise CoefficientError("DAM needs steps ≥ 1 and trigger_tokens ≥ 1")
        if self.trigger not in ("soft", "token"):
            raise CoefficientError(f"DAM trigger must be 'soft' or 'token', not {self.trigger!r}")
        if (
            self.candidates < 1
            or self.probe_size < 1
            or not 0 <= self.flip_threshold <= 1
            or not 0 <= self.max_frequency <= 1
        ):
            raise CoefficientError(
                "DAM needs candidates ≥ 1, probe_size ≥ 1, flip_threshold and max_frequency "
                "in [0, 1]"
            )


@dataclass(frozen=True)
class TokenTrigger:
    """A word found by :func:`invert_token_trigger` for one task.

    Attributes:
        token_id: Vocabulary id of the word.
        target: The class its insertion pushes predictions to.
        flip_rate: Fraction of probe inputs not predicted ``target`` that it flips to ``target``.
    """

    token_id: int
    target: int
    flip_rate: float


@dataclass(frozen=True)
class Quarantine:
    """Word-embedding rows overwritten in the merged encoder.

    Attributes:
        key: Encoder key of the word-embedding matrix.
        rows: Token ids whose rows are replaced.
        source: Token id whose row replaces them (the tokenizer's unknown token), or ``-1`` for
            a zero row.
    """

    key: str
    rows: tuple[int, ...]
    source: int = -1

    def apply(self, encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``encoder`` with the quarantined rows replaced (a new embedding tensor, rest shared)."""
        out = dict(encoder)
        if not self.rows:
            return out
        emb = encoder[self.key].detach().clone()
        idx = torch.tensor(self.rows, dtype=torch.long, device=emb.device)
        emb[idx] = emb[self.source].clone() if self.source >= 0 else 0.0
        out[self.key] = emb
        return out


@dataclass
class DamResult(LearnResult):
    """A :class:`LearnResult` (α, combined binary mask, losses) plus DAM's own diagnostics."""

    shared_density: float = 1.0
    detection_density: float = 1.0
    history: list[dict] = field(default_factory=list)
    triggers: dict[str, list[TokenTrigger]] = field(default_factory=dict)  # "token", per task
    quarantine: Quarantine | None = None  # "token": trigger words whose rows were neutralised
    flipped: float = 0.0  # share of entries of the combined mask M_b ⊙ M_s that are 0


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


def insert_token(inputs: Mapping[str, torch.Tensor], token_id: int) -> dict:
    """``inputs`` with the word ``token_id`` inserted after the first token of every row."""
    ids = inputs["input_ids"]
    col = ids.new_full((ids.shape[0], 1), token_id)
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids[:, :1], col, ids[:, 1:]], dim=1)
    am = inputs.get("attention_mask")
    if am is not None:
        out["attention_mask"] = torch.cat([am[:, :1], torch.ones_like(col), am[:, 1:]], dim=1)
    tt = inputs.get("token_type_ids")
    if tt is not None:
        out["token_type_ids"] = torch.cat([tt[:, :1], torch.zeros_like(col), tt[:, 1:]], dim=1)
    return out


def _rows(inputs: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in inputs.items()}


@torch.no_grad()
def _flip_rates(
    model, prefix, enc, inputs, words: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip rate and mean ``p(target)`` of ``inputs`` with each word inserted (one batch).

    Returns:
        Per word: the fraction of ``inputs`` predicted ``target`` and the mean probability of
        ``target``.
    """
    n = inputs["input_ids"].shape[0]
    batch = insert_token({k: v.repeat(len(words), 1) for k, v in inputs.items()}, 0)
    batch["input_ids"][:, 1] = words.to(batch["input_ids"].device).repeat_interleave(n)
    logits = functional_logits(model, prefix, enc, batch).view(len(words), n, -1)
    rate = (logits.argmax(-1) == target).float().mean(dim=1)
    return rate, logits.softmax(-1)[..., target].mean(dim=1)


def _probe(model, prefix, encoder, inputs, emb_key, exclude):
    """Shared set-up of the trigger searches on one probe batch.

    Returns:
        (detached encoder, its word embeddings, banned ids, clean predictions, number of
        classes, the probe's most frequent word to linearise around).
    """
    enc = {k: v.detach() for k, v in encoder.items()}
    emb = enc[emb_key]
    ban = torch.tensor(sorted(set(exclude)), dtype=torch.long, device=emb.device)
    with torch.no_grad():
        logits = functional_logits(model, prefix, enc, dict(inputs))
    start = _most_frequent_word(inputs["input_ids"], ban, emb.shape[0])
    return enc, emb, ban, logits.argmax(-1), logits.shape[-1], start


def invert_token_trigger(
    model: torch.nn.Module,
    prefix: str,
    encoder: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    emb_key: str,
    candidates: int = 32,
    exclude: Sequence[int] = (),
    rounds: int = 2,
) -> TokenTrigger:
    """The single word whose insertion flips the most predictions to one class (trigger inversion).

    A discrete analogue of DAM's trigger simulation for text (Yang et al., ICLR 2025 simulate an
    additive input perturbation; a text backdoor is a rare inserted word). For every class c:
    take the probe inputs not predicted c, insert a real word e₀ after the first token (the
    probe's most frequent word: linearising around the mean embedding, which no word has, ranks
    a planted trigger among the last) and score every word w by the first-order gain
    ``(E_w − e₀)·∇_{e₀} mean log p_c`` (HotFlip, Ebrahimi et al., ACL 2018); the ``candidates``
    best words are then inserted for real and the flip rate ``P(ŷ = c | x ⊕ w, ŷ(x) ≠ c)`` is
    measured; ``rounds`` repeats this around the best word found (coordinate ascent, as the
    universal-trigger search of Wallace et al., EMNLP 2019). Returns the (word, class) with the
    highest rate (ties: the higher mean ``p_c``). No label is read.

    Args:
        model: Task classifier (head used; its encoder weights come from ``encoder``).
        prefix: Encoder prefix in ``model``.
        encoder: Encoder weights θ (detached or not: only read here).
        inputs: Unlabeled probe batch.
        emb_key: Key of the word-embedding matrix in ``encoder``.
        candidates: Words per class and round tried exactly.
        exclude: Token ids never proposed (special tokens).
        rounds: Linearisation rounds per class.

    Returns:
        :class:`TokenTrigger` (flip rate 0 if every input is predicted the same class).
    """
    enc, emb, ban, clean, n_cls, start = _probe(model, prefix, encoder, inputs, emb_key, exclude)
    best = TokenTrigger(token_id=-1, target=-1, flip_rate=0.0)
    best_key = (0.0, 0.0)
    for c in range(n_cls):
        idx = (clean != c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        sub = _rows(inputs, idx)
        at, tried = start, torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
        for _ in range(rounds):
            words = _hotflip_words(model, prefix, enc, sub, emb_key, c, at, candidates, ban, tried)
            tried[words] = True
            rates, prob = _flip_rates(model, prefix, enc, sub, words, c)
            j = int((rates + 1e-3 * prob).argmax())  # ties in the rate: the surer flip
            key = (float(rates[j]), float(prob[j]))
            if key > best_key:
                best_key = key
                best = TokenTrigger(token_id=int(words[j]), target=c, flip_rate=float(rates[j]))
            at = int(words[j])  # next round: linearise around the best word of this one
    return best


def _hotflip_words(model, prefix, enc, sub, emb_key, c, start, k, ban, tried=None):
    """The ``k`` words with the largest first-order gain of mean ``log p_c`` at position 1."""
    emb = enc[emb_key]
    e0 = emb[start].unsqueeze(0).clone().requires_grad_(True)
    logp = F.log_softmax(triggered_logits(model, prefix, enc, sub, e0, emb_key), dim=-1)
    (g,) = torch.autograd.grad(logp[:, c].mean(), e0)
    with torch.no_grad():
        score = emb @ g[0]
        if tried is not None:
            score[tried] = float("-inf")
        if ban.numel():
            score[ban] = float("-inf")
        return score.topk(min(k, score.numel())).indices


def find_triggers(
    model: torch.nn.Module,
    prefix: str,
    encoder: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    emb_key: str,
    tau_embedding: torch.Tensor | None,
    candidates: int = 16,
    threshold: float = 0.9,
    exclude: Sequence[int] = (),
) -> list[TokenTrigger]:
    """Every candidate word that flips at least ``threshold`` of a task's inputs to one class.

    Candidates come from two places: the words the gradient ranks first for each class (as in
    :func:`invert_token_trigger`, one round) and the rows of this expert's task vector on the
    word embeddings with the largest change ``‖τ[w]‖`` — a planted trigger is a word the
    poisoned fine-tune moved a lot though clean data hardly contains it (measured: "cf" is
    the largest of 30 522 rows of the poisoned expert's τ). Each is inserted after the first
    token of the probe inputs not predicted c; its flip rate is the fraction then predicted c.

    Args:
        model: Task classifier (its head; encoder weights from ``encoder``).
        prefix: Encoder prefix in ``model``.
        encoder: Merged encoder weights θ.
        inputs: Unlabeled probe batch of this task.
        emb_key: Key of the word-embedding matrix.
        tau_embedding: This expert's task vector on the word embeddings (vocab × hidden), or
            ``None`` for gradient candidates only.
        candidates: Words per source (per class for the gradient).
        threshold: Minimum flip rate of a trigger.
        exclude: Token ids never proposed (special tokens).

    Returns:
        Triggers, highest flip rate first.
    """
    enc, emb, ban, clean, n_cls, start = _probe(model, prefix, encoder, inputs, emb_key, exclude)
    rows = torch.empty(0, dtype=torch.long, device=emb.device)
    if tau_embedding is not None:
        norm = tau_embedding.detach().float().norm(dim=-1).to(emb.device)
        if ban.numel():
            norm[ban] = -1.0
        rows = norm.topk(min(candidates, norm.numel())).indices
    found: dict[int, TokenTrigger] = {}
    for c in range(n_cls):
        idx = (clean != c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        sub = _rows(inputs, idx)
        grad_words = _hotflip_words(model, prefix, enc, sub, emb_key, c, start, candidates, ban)
        words = torch.unique(torch.cat([grad_words, rows]))
        rates, _ = _flip_rates(model, prefix, enc, sub, words, c)
        for w, r in zip(words.tolist(), rates.tolist(), strict=True):
            if r >= threshold and r > found.get(w, TokenTrigger(w, c, -1.0)).flip_rate:
                found[w] = TokenTrigger(token_id=w, target=c, flip_rate=r)
    return sorted(found.values(), key=lambda tr: -tr.flip_rate)


def text_frequency(unlabeled: Mapping[str, Examples], vocab: int) -> torch.Tensor:
    """Fraction of all unlabeled texts (every task) that contain each token id."""
    seen = torch.zeros(vocab, dtype=torch.long)
    n = 0
    for ex in unlabeled.values():
        all_ids = ex.inputs["input_ids"]
        n += all_ids.shape[0]
        for ids in all_ids.split(256):  # texts × vocab flags, 256 texts at a time
            present = torch.zeros(ids.shape[0], vocab, dtype=torch.bool)
            present.scatter_(1, ids.clamp(0, vocab - 1), True)
            seen += present.sum(dim=0)
    return seen.float() / max(n, 1)


def _most_frequent_word(ids: torch.Tensor, ban: torch.Tensor, vocab: int) -> int:
    """The most frequent non-special token of the probe: a real word to linearise around."""
    counts = torch.bincount(ids.flatten(), minlength=vocab)
    if ban.numel():
        counts[ban] = 0
    return int(counts.argmax())


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
    special_ids: Sequence[int] = (),
    unk_id: int = -1,
) -> DamResult:
    """Learn DAM's dual masks (and, over AdaMerging, λ) on unlabeled inputs of every task.

    With ``spec.trigger == "token"`` the simulated triggers are words found by
    :func:`find_triggers` on the initial merge (masks all ones) for every task: words that flip
    at least ``flip_threshold`` of its probe inputs to one class. Only tasks with such a word get
    the safety loss (a clean merge keeps M_b = 1: the detection mask is never updated without a
    suspect), L_safe = Σ_t CE(f_t(x ⊕ w_t; θ), ŷ_t(x)) with the word's embedding read from θ.
    With ``spec.quarantine`` on, trigger words that occur in at most ``max_frequency`` of the
    unlabeled texts are also **quarantined** (a separate defence): their word-embedding rows in
    the merged encoder are replaced by the unknown token's (``unk_id``; a zero row without one).
    Masks act on τ only, and each task keeps its own expert's classification head — a head
    fine-tuned on poisoned data keeps the backdoor on θ_0's own embedding of the trigger, which
    only the quarantine removes (``safety.poison.threat: encoder`` keeps heads clean instead).

    Args:
        fm: The functional merge over θ_0 and every task vector; ``task`` block scheme.
        models: Task → expert classifier (only its head is used; frozen).
        prefix: Encoder prefix inside the task models.
        unlabeled: Task → inputs (labels never read).
        spec: Hyper-parameters.
        on_step: Called with (step, {losses}) after every step.
        special_ids: Token ids the ``token`` inversion never proposes (the tokenizer's special
            tokens).
        unk_id: The tokenizer's unknown-token id; quarantined rows take its embedding (``-1``:
            a zero row).

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

    found: dict[str, list[TokenTrigger]] = {}
    quarantine = None
    if spec.trigger == "token":
        with torch.no_grad():
            enc0 = fm.merged(alpha0, {k: torch.ones_like(v) for k, v in logits_s.items()})
        for t in tasks:
            n = min(spec.probe_size, len(unlabeled[t]))
            probe = unlabeled[t].batch(torch.arange(n), fm.device)[0]
            found[t] = find_triggers(
                models[t],
                prefix,
                enc0,
                probe,
                emb_key,
                fm.stacked[emb_key][fm.tasks.index(t)],
                spec.candidates,
                spec.flip_threshold,
                special_ids,
            )
        del enc0
        freq = text_frequency(unlabeled, fm.base[emb_key].shape[0])
        words = sorted({tr.token_id for trs in found.values() for tr in trs})
        rows = [w for w in words if spec.quarantine and float(freq[w]) <= spec.max_frequency]
        quarantine = Quarantine(key=emb_key, rows=tuple(rows), source=unk_id)
    suspects = {t: trs[0] for t, trs in found.items() if trs}

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
        # (2) simulated trigger: one ascent step on the prediction change, weights detached
        # ("soft"), or the words found before the loop ("token").
        with torch.no_grad():
            enc_fixed = fm.merged(alpha, {k: v.detach() for k, v in mask.items()})
        if spec.trigger == "soft":
            clean_pred, adv = trigger_ascent_step(
                models, prefix, enc_fixed, batches, delta, emb_key, opt_d, radius
            )
        else:
            with torch.no_grad():
                clean_pred = {
                    t: functional_logits(models[t], prefix, enc_fixed, batches[t]).argmax(-1)
                    for t in suspects
                }
            # reported as "adv": the summed flip rate of the words in use
            adv = torch.tensor(float(sum(tr.flip_rate for tr in suspects.values())))
        del enc_fixed
        # (3) alternating mask step (no detection step without a suspect in "token" mode).
        detect_step = step % 2 == 0 and (spec.trigger == "soft" or bool(suspects))
        enc = fm.merged(alpha, mask)
        perf = safe = 0.0
        for t, x in batches.items():
            logits = functional_logits(models[t], prefix, enc, x)
            perf = perf + entropy(logits)
            if detect_step and spec.trigger == "soft":
                trig = triggered_logits(models[t], prefix, enc, x, delta[t].detach(), emb_key)
                safe = safe + F.cross_entropy(trig, clean_pred[t])
            elif detect_step and t in suspects:
                trig = functional_logits(
                    models[t], prefix, enc, insert_token(x, suspects[t].token_id)
                )
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
        flipped=1.0 - density(final),
        history=history,
        triggers=found,
        quarantine=quarantine,
    )
