"""A merged encoder as a function of its coefficients: θ(α) = θ_0 + Σ_t α_{t,b} ⊙ τ_{t,b}.

The merged weights are recomputed inside every forward pass and fed to the task models with
:func:`torch.func.functional_call`, so the only trainable state is α (and, for Concrete masks, the
mask logits). Memory is θ_0 + the stacked task vectors + activations; no model is ever copied.

Block schemes (which entries of τ_t share one coefficient):

- ``task``: one scalar per task (task-wise AdaMerging; Yang et al., "AdaMerging: Adaptive Model
  Merging for Multi-Task Learning", ICLR 2024, Eq. 3: θ = θ_0 + Σ_t λ_t τ_t).
- ``layer``: one scalar per parameter tensor per task (layer-wise AdaMerging, Eq. 4:
  θ^l = θ_0^l + Σ_t λ_t^l τ_t^l; also aTLAS's default block-diagonal Λ_t with one block per
  parameter tensor: Zhang et al., "Knowledge Composition using Task Vectors with Learned
  Anisotropic Scaling", NeurIPS 2024, Eq. 2: θ = θ_0 + Σ_t Λ_t τ_t).
- ``atlas``: aTLAS×K — every tensor's entries are split into K random, seeded partitions, one
  coefficient each (Zhang et al. 2024, Sec. 5 "aTLAS×K").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergeflow.tensors import MergeError

SCHEMES = ("task", "layer", "atlas")


class CoefficientError(ValueError):
    """Bad input to learned merging (unknown scheme, bad data, diverging coefficients)."""


@dataclass(frozen=True)
class BlockScheme:
    """How the entries of each task vector are grouped under coefficients.

    Attributes:
        kind: ``task``, ``layer`` or ``atlas``.
        partitions: K for ``atlas`` (≥ 1; K = 1 is ``layer``); ignored otherwise.
        seed: Seed of the random partitions (``atlas`` only).
    """

    kind: str
    partitions: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.kind not in SCHEMES:
            raise CoefficientError(
                f"unknown block scheme {self.kind!r}; available: {', '.join(SCHEMES)}"
            )
        if self.partitions < 1 or self.partitions > 255:
            raise CoefficientError(f"partitions must be in [1, 255], got {self.partitions}")

    def shape(self, n_tasks: int, n_tensors: int) -> tuple[int, ...]:
        """Shape of α: (T, 1), (T, L) or (T, L, K)."""
        if self.kind == "task":
            return (n_tasks, 1)
        if self.kind == "layer":
            return (n_tasks, n_tensors)
        return (n_tasks, n_tensors, self.partitions)


def partition_index(shape: Sequence[int], k: int, seed: int, position: int) -> torch.Tensor:
    """Seeded random partition of a tensor's entries into ``k`` groups (uint8, CPU).

    The same (shape, k, seed, position of the tensor in the key order) gives the same partition on
    every machine, so a saved α can be re-applied without storing the index.
    """
    n = 1
    for s in shape:
        n *= int(s)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + position)
    return torch.randint(0, k, (n,), generator=g, dtype=torch.int64).to(torch.uint8).view(*shape)


class FunctionalMerge:
    """θ_0 and stacked task vectors; builds θ(α) differentiably in α.

    Args:
        base: θ_0 (encoder keys).
        task_vectors: Task → τ_t over the floating-point keys of ``base``.
        scheme: The block scheme.
        device: Where tensors live.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
        scheme: BlockScheme,
        device: str | torch.device = "cpu",
    ):
        if not task_vectors:
            raise CoefficientError("no task vectors to merge")
        self.device = torch.device(device)
        self.scheme = scheme
        self.tasks = list(task_vectors)
        self.keys = [k for k, v in base.items() if v.is_floating_point()]
        self.base = {
            k: v.to(self.device, torch.float32) if v.is_floating_point() else v.to(self.device)
            for k, v in base.items()
        }
        self.stacked: dict[str, torch.Tensor] = {}
        for k in self.keys:
            missing = [t for t in self.tasks if k not in task_vectors[t]]
            if missing:
                raise MergeError(f"task vector(s) of {missing} lack tensor {k!r}")
            self.stacked[k] = torch.stack(
                [task_vectors[t][k].to(self.device, torch.float32) for t in self.tasks]
            )
            if self.stacked[k].shape[1:] != base[k].shape:
                raise MergeError(f"tensor {k!r}: task-vector shape differs from the base")
        self.parts: dict[str, torch.Tensor] = {}
        if scheme.kind == "atlas":
            self.parts = {
                k: partition_index(self.base[k].shape, scheme.partitions, scheme.seed, i).to(
                    self.device
                )
                for i, k in enumerate(self.keys)
            }

    @property
    def alpha_shape(self) -> tuple[int, ...]:
        """Shape of α for this scheme."""
        return self.scheme.shape(len(self.tasks), len(self.keys))

    def full_alpha(self, value: float) -> torch.Tensor:
        """α filled with ``value`` (float32 on the device)."""
        return torch.full(self.alpha_shape, float(value), device=self.device)

    def one_hot_alpha(self, task: str) -> torch.Tensor:
        """α selecting ``task``'s vector everywhere (reproduces that expert)."""
        a = self.full_alpha(0.0)
        a[self.tasks.index(task)] = 1.0
        return a

    def coef(self, alpha: torch.Tensor, i: int, key: str) -> torch.Tensor:
        """Per-task coefficients of tensor ``i`` broadcastable against τ[key] (shape (T, …))."""
        shape = self.base[key].shape
        if self.scheme.kind == "task":
            return alpha[:, 0].view(-1, *([1] * len(shape)))
        if self.scheme.kind == "layer":
            return alpha[:, i].view(-1, *([1] * len(shape)))
        return alpha[:, i, :][:, self.parts[key].long()]

    def delta(
        self, alpha: torch.Tensor, mask: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Σ_t α_{t,b} ⊙ (m ⊙ τ_{t,b}) per key (``mask`` shared by all tasks, optional)."""
        if tuple(alpha.shape) != self.alpha_shape:
            raise CoefficientError(
                f"α has shape {tuple(alpha.shape)}, expected {self.alpha_shape} "
                f"for scheme {self.scheme.kind!r}"
            )
        out = {}
        for i, k in enumerate(self.keys):
            tv = self.stacked[k] if mask is None else self.stacked[k] * mask[k]
            out[k] = (self.coef(alpha, i, k) * tv).sum(0)
        return out

    def merged(
        self, alpha: torch.Tensor, mask: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """θ(α) over every key of θ_0 (non-float buffers copied from θ_0)."""
        d = self.delta(alpha, mask)
        return {k: (self.base[k] + d[k]) if k in d else self.base[k] for k in self.base}


def functional_logits(model, prefix: str, encoder: Mapping[str, torch.Tensor], inputs: dict):
    """Logits of a task model whose encoder weights are ``encoder`` (its head stays its own).

    Uses :func:`torch.func.functional_call`, so gradients reach whatever ``encoder`` was computed
    from (α) and the module's own parameters are left untouched.
    """
    params = {f"{prefix}.{k}": v for k, v in encoder.items()}
    return torch.func.functional_call(model, params, args=(), kwargs=inputs, strict=False).logits
