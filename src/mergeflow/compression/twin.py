"""Twin-Merging: a shared merged expert plus small SVD-compressed task-exclusive parts, routed per input.

Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging" (NeurIPS 2024).
The shared expert θ* is an ordinary merge (task arithmetic or TIES). What it loses for task t is the
exclusive part δ_t = θ_t − θ*, compressed per matrix by truncated SVD,
δ_t ≈ U_{t,k} Σ_{t,k} V_{t,k}ᵀ (rank k; vectors such as biases and LayerNorm kept dense).
A router r(x) = softmax(W·φ_{θ*}(x) + b), trained on validation inputs to tell the tasks apart from
the shared model's mean-pooled features φ, weights the exclusive parts at inference:
θ(x) = θ* + Σ_t r_t(x)·δ̂_t. With ``top1`` routing every input gets θ* + δ̂_{argmax r(x)}, so a
batch is split into one group per routed task and weights are built once per group, not per input.

Archive layout: ``shared.safetensors`` (θ*), ``exclusive/<task>.safetensors`` (``<name>.U`` with
Σ folded in and ``<name>.V`` for matrices, ``<name>.dense`` for vectors), ``router.safetensors``,
``heads/<task>.safetensors``, ``manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mergeflow.io import SafetensorsFile, atomic_dir, save_state_dict, write_json_atomic

FORMAT = "mergeflow.twin/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TwinError(ValueError):
    """A Twin-Merging archive or input that cannot be used; the message names what to fix."""


def svd_compress(delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Rank-``rank`` factors of one tensor's exclusive part (dense for tensors of rank < 2).

    δ ≈ (U_k Σ_k) V_kᵀ; higher-rank tensors are flattened to (shape[0], rest) first.

    Args:
        delta: θ_t − θ* for one tensor.
        rank: Kept singular values (clipped to the matrix's rank).

    Returns:
        ``{"U": m×k, "V": k×n}`` or ``{"dense": delta}``.
    """
    if delta.dim() < 2:
        return {"dense": delta.float()}
    m = delta.float().reshape(delta.shape[0], -1)
    k = min(rank, *m.shape)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return {"U": (u[:, :k] * s[:k]).contiguous(), "V": vh[:k].contiguous()}


def svd_expand(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`svd_compress` (float32)."""
    if "dense" in parts:
        return parts["dense"].float().reshape(shape)
    return (parts["U"].float() @ parts["V"].float()).reshape(shape)


def exclusive_parts(
    shared: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor], rank: int
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (tensor name, compressed δ_t) for every floating tensor, one tensor at a time."""
    for name, s in shared.items():
        if s.is_floating_point():
            yield name, svd_compress(expert[name].float() - s.float(), rank)


class Router(torch.nn.Module):
    """Linear router over the shared model's pooled features: r(x) = softmax(W φ(x) + b)."""

    def __init__(self, dim: int, n_tasks: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, n_tasks)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Routing probabilities, one row per input."""
        return torch.softmax(self.linear(feats), dim=-1)


def train_router(
    feats: torch.Tensor, task_ids: torch.Tensor, n_tasks: int, *, epochs: int, seed: int
) -> Router:
    """Fit the router with full-batch Adam + cross-entropy on (features, task id) pairs.

    Features are standardised inside the router's first layer (mean/std folded into W, b) so the
    learning rate does not depend on the encoder's feature scale.
    """
    torch.manual_seed(seed)
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    x = (feats - mu) / sd
    router = Router(feats.shape[1], n_tasks)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(router.linear(x), task_ids)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the layer: W' = W/sd, b' = b − W'·mu
        w = router.linear.weight / sd
        router.linear.bias -= w @ mu
        router.linear.weight.copy_(w)
    return router.eval()


def write_archive(
    out: str | Path,
    shared: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    router: Router,
    *,
    rank: int,
    dtype: str = "float16",
    extra: Mapping | None = None,
) -> dict:
    """Write a Twin-Merging archive atomically.

    Args:
        out: Archive directory.
        shared: θ* (the shared merged encoder).
        experts: Task → θ_t (encoder); the order of tasks is the router's output order.
        heads: Task → head tensors.
        router: The trained router.
        rank: SVD rank of the exclusive parts.
        dtype: Storage dtype of the exclusive factors.
        extra: More manifest fields (e.g. how θ* was merged).

    Returns:
        The manifest.
    """
    if dtype not in _DTYPES:
        raise TwinError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if rank < 1:
        raise TwinError(f"rank must be >= 1, got {rank}")
    tasks = list(experts)
    if router.linear.out_features != len(tasks):
        raise TwinError(f"router has {router.linear.out_features} outputs for {len(tasks)} tasks")
    with atomic_dir(out) as tmp:
        save_state_dict(dict(shared), tmp / "shared.safetensors", metadata={"kind": "twin_shared"})
        (tmp / "exclusive").mkdir()
        (tmp / "heads").mkdir()
        for t in tasks:
            flat = {
                f"{name}.{part}": v.to(_DTYPES[dtype])
                for name, parts in exclusive_parts(shared, experts[t], rank)
                for part, v in parts.items()
            }
            save_state_dict(flat, tmp / "exclusive" / f"{t}.safetensors", metadata={"task": t})
            save_state_dict(dict(heads[t]), tmp / "heads" / f"{t}.safetensors")
        save_state_dict(
            {k: v.detach().contiguous() for k, v in router.state_dict().items()},
            tmp / "router.safetensors",
        )
        manifest = {"format": FORMAT, "tasks": tasks, "rank": rank, "dtype": dtype, **(extra or {})}
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


class TwinModel:
    """A loaded Twin-Merging archive: θ*, the router and lazily expanded exclusive parts."""

    def __init__(self, archive: str | Path):
        self.archive = Path(archive)
        f = self.archive / "manifest.json"
        if not f.is_file():
            raise TwinError(f"{archive}: not a Twin-Merging archive (no manifest.json)")
        self.manifest = json.loads(f.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TwinError(f"{archive}: unsupported format {self.manifest.get('format')!r}")
        self.tasks: list[str] = list(self.manifest["tasks"])
        self.shared = dict(SafetensorsFile(self.archive / "shared.safetensors").items())
        rsd = dict(SafetensorsFile(self.archive / "router.safetensors").items())
        self.router = Router(rsd["linear.weight"].shape[1], len(self.tasks))
        self.router.load_state_dict(rsd)
        self.router.eval()
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def expert(self, task: str) -> dict[str, torch.Tensor]:
        """θ* + δ̂_task (cached: built once per task, not per input)."""
        if task not in self.tasks:
            raise TwinError(
                f"{self.archive}: task {task!r} is not in the archive; has {self.tasks}"
            )
        if task not in self._cache:
            f = SafetensorsFile(self.archive / "exclusive" / f"{task}.safetensors")
            out = {}
            for name, s in self.shared.items():
                if not s.is_floating_point():
                    out[name] = s
                    continue
                parts = {p: f.get(f"{name}.{p}") for p in ("U", "V", "dense") if f"{name}.{p}" in f}
                if not parts:
                    raise TwinError(f"{f.path}: exclusive part of {name!r} is missing")
                out[name] = (s.float() + svd_expand(parts, s.shape)).to(s.dtype)
            self._cache[task] = out
        return self._cache[task]

    def mixture(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ* + Σ_t w_t δ̂_t for one weight vector (soft routing of one input)."""
        out = {}
        for name, s in self.shared.items():
            if not s.is_floating_point():
                out[name] = s
                continue
            acc = s.float().clone()
            for w, t in zip(weights.tolist(), self.tasks, strict=True):
                if w > 0:
                    acc += w * (self.expert(t)[name].float() - s.float())
            out[name] = acc.to(s.dtype)
        return out

    def route(self, feats: torch.Tensor) -> torch.Tensor:
        """Routing probabilities for pooled features (rows = inputs)."""
        with torch.no_grad():
            return self.router(feats.float())

    def heads(self, task: str) -> dict[str, torch.Tensor]:
        """The task's classification head."""
        return dict(SafetensorsFile(self.archive / "heads" / f"{task}.safetensors").items())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over non-padding positions: φ(x) = Σ_i m_i h_i / Σ_i m_i."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
