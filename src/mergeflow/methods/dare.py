"""DARE: drop-and-rescale (Yu et al., "Language Models are Super Mario", ICML 2024)."""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mergeflow.methods import chunks
from mergeflow.methods.chunks import BaseF32, TensorInputs, ranges, task_slice
from mergeflow.methods.params import MethodParams
from mergeflow.methods.registry import register
from mergeflow.methods.ties import disjoint_merge

PAPER = (
    "Yu, Yu, Yu, Huang, Li. Language Models are Super Mario: Absorbing Abilities from "
    "Homologous Models as a Free Lunch. ICML 2024. arXiv:2311.03099"
)

_F32 = torch.float32


class DareParams(MethodParams):
    """Hyper-parameters of DARE."""

    drop_rate: float = Field(0.9, ge=0, lt=1, description="probability p of dropping a delta")
    rescale: Literal["inverse", "l1"] = Field(
        "inverse",
        description="'inverse': multiply survivors by 1/(1-p) (paper); 'l1': rescale so each "
        "tensor's L1 norm is preserved (as mergekit does)",
    )
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic",
        description="how sparsified task vectors are combined: sum (paper) or TIES sign "
        "election + disjoint mean with no further trim (DARE-TIES)",
    )
    scaling: float = Field(1.0, ge=0, description="λ applied to the combined task vector")
    seed: int = Field(0, ge=0, description="RNG seed; results are deterministic given it")


def tensor_seed(seed: int, task: str, name: str) -> int:
    """Deterministic 63-bit seed for one (task, tensor) pair.

    ``blake2b(f"{seed}|{task}|{name}")`` — stable across processes (unlike ``hash``) and
    independent of dict order, so a random merge (DARE, Yu et al., ICML 2024) is reproducible.

    Args:
        seed: User seed.
        task: Task name.
        name: Tensor key.

    Returns:
        Non-negative integer < 2**63.

    """
    h = hashlib.blake2b(f"{seed}\x1f{task}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def keep_mask(
    shape: torch.Size | tuple[int, ...], drop_rate: float, seed: int, task: str, name: str
) -> torch.Tensor:
    """Bernoulli keep-mask ``m ~ Bernoulli(1 − p)`` for one (task, tensor).

    Drawn from a NumPy ``SFC64`` bit generator seeded with :func:`tensor_seed` ``(seed, task,
    name)``, so the mask does not depend on dict order or on which other tensors exist. Each
    entry takes 32 random bits ``u`` (uniform on the int32 range) and is kept iff
    ``u ≥ −2³¹ + round(p·2³²)``, i.e. with probability ``1 − p`` up to ``2⁻³³``. Raw bits are
    about 4× cheaper than ``torch.rand`` floats, and the generator releases the GIL, so masks
    are drawn on a helper thread while the previous expert is merged. Yu et al., "Language
    Models are Super Mario" (ICML 2024).

    Args:
        shape: Tensor shape.
        drop_rate: ``p`` in ``[0, 1)``.
        seed: User seed.
        task: Task name.
        name: Tensor key.

    Returns:
        Bool CPU tensor of ``shape``; ``True`` = keep.

    """
    n = math.prod(shape)
    threshold = round(drop_rate * 2**32) - 2**31
    if threshold > 2**31 - 1:  # p within 2⁻³³ of 1: nothing is kept
        return torch.zeros(tuple(shape), dtype=torch.bool)
    bits = np.random.SFC64(tensor_seed(seed, task, name)).random_raw((n + 1) // 2)
    u = torch.from_numpy(bits.view(np.int32)[:n])
    return (u >= threshold).reshape(tuple(shape))


_MASK_POOL: ThreadPoolExecutor | None = None


class _MasksAhead:
    """Keep-masks of one tensor, drawn one expert ahead on a helper thread.

    Expert ``i + 1``'s mask is drawn while expert ``i`` is merged (NumPy's generator and the
    comparison release the GIL); at most two masks are held.
    """

    def __init__(self, inp: TensorInputs, params: DareParams):
        self.inp, self.params = inp, params
        self.ahead: dict[int, Future] = {}

    def _submit(self, i: int) -> None:
        global _MASK_POOL
        if i >= len(self.inp.tasks) or i in self.ahead:
            return
        if _MASK_POOL is None:
            _MASK_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dare-mask")
        inp, pr = self.inp, self.params
        self.ahead[i] = _MASK_POOL.submit(
            keep_mask, inp.base.shape, pr.drop_rate, pr.seed, inp.tasks[i], inp.name
        )

    def get(self, i: int) -> torch.Tensor:
        self._submit(i)
        m = self.ahead.pop(i).result()
        self._submit(i + 1)
        return m


@register("dare", DareParams, paper=PAPER)
def dare(inp: TensorInputs, params: DareParams, ctx: None = None) -> torch.Tensor:
    """DARE of one tensor: randomly drop task-vector entries, rescale, then combine.

    For every task ``t``: ``m_t ~ Bernoulli(1 − p)`` (:func:`keep_mask`) and
    ``τ̃_t = m_t ⊙ τ_t / (1 − p)`` (``rescale="inverse"``, so ``E[τ̃_t] = τ_t``) or
    ``τ̃_t = m_t ⊙ τ_t · ‖τ_t‖₁ / ‖m_t ⊙ τ_t‖₁`` (``"l1"``: the tensor's L1 norm is preserved;
    left unscaled if either norm is 0). Then ``τ_merged = Σ_t τ̃_t``
    (``combine="task_arithmetic"``) or the TIES elect + disjoint mean of the ``τ̃_t`` with no
    magnitude trim (``combine="ties"``, i.e. TIES density 1, see
    :func:`~mergeflow.methods.ties.disjoint_merge`); ``θ = θ_0 + λ τ_merged``. Yu et al.,
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch" (ICML 2024). ``p = 0`` keeps everything and both rescales are the identity.

    Args:
        inp: The tensor's base value and expert readers.
        params: ``drop_rate``, ``rescale``, ``combine``, ``scaling`` (λ, applied by the
            caller), ``seed``.
        ctx: Unused (DARE needs no whole-model statistics).

    Returns:
        Flat float32 ``τ_merged``.

    """
    bf = BaseF32(inp.base)
    n = bf.numel()
    p = params.drop_rate
    cache: dict[int, tuple] = {}
    m_len = min(n, chunks.CHUNK)
    mf = torch.empty(m_len, dtype=_F32, device=bf.device)  # a chunk of the keep-mask as 0. / 1.
    scratch = torch.empty(m_len, dtype=_F32, device=bf.device)
    masks = _MasksAhead(inp, params)

    def mask_and_factor(i: int, e: torch.Tensor) -> tuple:
        """Expert i's keep-mask and rescale factor; for ``l1``, also its whole ``m ⊙ τ``."""
        if i in cache:
            return cache[i]
        cache.clear()  # experts are visited once, in order
        if p == 0:
            res: tuple = (None, 1.0)
        else:
            m = masks.get(i).reshape(-1)
            if params.rescale == "inverse":
                res = (m, 1.0)
            else:
                # one pass: m ⊙ τ is kept whole (one float32 copy of this tensor) so the rows
                # need not recompute τ and the mask once the factor ‖τ‖₁ / ‖m ⊙ τ‖₁ is known
                kept = torch.empty(n, dtype=_F32, device=bf.device)
                org = new = 0.0
                for s in ranges(n):
                    k = kept[s].copy_(e[s]).sub_(bf[s])  # τ, same rounding as task_slice
                    a = torch.abs(k, out=scratch[: k.numel()])
                    org += float(a.sum())
                    mk = mf[: k.numel()].copy_(m[s])
                    new += float(torch.dot(a, mk))
                    k.mul_(mk)
                res = (None, org / new if org > 0 and new > 0 else 1.0, kept)  # mask freed
        cache[i] = res
        return res

    def row(i: int, e: torch.Tensor, s: slice) -> torch.Tensor:
        m, factor, *kept = mask_and_factor(i, e)
        if kept:  # l1: m ⊙ τ computed already; the caller may modify this slice in place
            r = kept[0][s]
            return r.mul_(factor) if factor != 1.0 else r
        tau = task_slice(e, bf, s)
        if m is None:
            return tau
        kept_tau = tau.mul_(mf[: tau.numel()].copy_(m[s]))  # float × float: ~4× faster than × bool
        return kept_tau.div_(1.0 - p)

    if params.combine == "ties":
        return disjoint_merge(inp, lambda i, e, s: (row(i, e, s), 0.0))
    acc = torch.zeros(n, dtype=_F32, device=bf.device)
    for i in range(len(inp.tasks)):
        e = inp.expert(i).reshape(-1)
        for s in ranges(n):
            acc[s] += row(i, e, s)
    return acc
