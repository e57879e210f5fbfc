"""LoRA-LEGO: merge LoRA experts by clustering their rank-1 units, saved as one peft adapter.

Zhao, Shen, Zhu, Li, Su, Wang, Kuang, Wu, "Merging LoRAs like Playing LEGO: Pushing the Modularity
of LoRA to Extremes Through Rank-Wise Clustering" (ICLR 2025, arXiv:2409.16167).

A LoRA update is a sum of rank-1 *minimal semantic units* (MSUs):
ΔW = s·B·A = Σ_{i=1}^{r} s·b_i a_iᵀ, with a_i the i-th row of A, b_i the i-th column of B and
s = α/r (α/√r for rsLoRA; r and α per module from ``rank_pattern``/``alpha_pattern`` resolved as
peft resolves them, :func:`mergeflow.models.lora.lora_scaling`). The units of every adapter of
one module form a pool {u_i = (a_i, b_i)}; the pool is clustered into k groups C_1..C_k by
k-means on the normalised concatenations u_i/‖u_i‖; each cluster is merged into its centroid
c_j = mean_{i∈C_j} u_i, which is rescaled to the cluster's mean norm (the paper's parameter
reweighting against norm decay):

    ĉ_j = c_j · (mean_{i∈C_j} ‖u_i‖) / ‖c_j‖,    ΔW_merged = Σ_{j=1}^{k} b̂_j âᵀ_j,

i.e. a LoRA of rank k (A rows â_j, B columns b̂_j, α = k so the scale is 1).

Choices this implementation makes where the paper leaves freedom (none changes any adapter's ΔW):
s is folded into each unit and the unit is balanced, a_i ← a_i·√(s‖b_i‖/‖a_i‖),
b_i ← b_i·√(s‖a_i‖/‖b_i‖), so that ‖a_i‖ = ‖b_i‖ and both halves count in the clustering; and the sign
of (a_i, b_i) is fixed so the largest-magnitude entry of u_i is positive (−b·(−a)ᵀ = b aᵀ).
k-means is k-means++ seeded by ``seed`` followed by Lloyd iterations, so the result is deterministic.
With one adapter and k equal to its rank, every unit is its own cluster and the adapter's ΔW is
reproduced. The paper's second, output-side reweighting is available as ``output_scale``.

DoRA adapters (Liu et al., ICML 2024) are refused: their weights ``m·(W + s·BA)/‖W + s·BA‖_c``
are not a sum of rank-1 units, so clustering B·A alone would drop the magnitudes ``m`` (and
with them part of each adapter's update), and the paper defines no merge of magnitudes.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from mergeflow.engine.lora import adapter_config
from mergeflow.io import atomic_dir, check_out, save_state_dict
from mergeflow.models.lora import LORA_A, LORA_B, AdapterError, is_adapter_tensor, lora_modules
from mergeflow.tensors import MergeError

_F32 = torch.float32


def split_units(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The rank-1 units of one LoRA module as rows u_i = (a_i, b_i), with Σ_i b_i a_iᵀ = s·B·A.

    Args:
        a: ``lora_A`` (r × n).
        b: ``lora_B`` (m × r).
        scale: s.

    Returns:
        ``(r, n + m)`` float32, each unit balanced (‖a_i‖ = ‖b_i‖) and sign-fixed.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise MergeError(f"LoRA factors do not fit: A {tuple(a.shape)}, B {tuple(b.shape)}")
    a, b = a.to(_F32), b.to(_F32).T  # b: r × m
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ok = (na > 0) & (nb > 0)
    ga = torch.where(ok, (abs(scale) * nb / na.clamp_min(1e-30)).sqrt(), math.sqrt(abs(scale)))
    gb = torch.where(ok, (abs(scale) * na / nb.clamp_min(1e-30)).sqrt(), math.sqrt(abs(scale)))
    u = torch.cat([a * ga, b * gb * math.copysign(1.0, scale)], dim=1)
    top = u.gather(1, u.abs().argmax(dim=1, keepdim=True))
    return u * torch.where(top < 0, -1.0, 1.0)


def kmeans(x: torch.Tensor, k: int, *, seed: int, iters: int = 100) -> torch.Tensor:
    """Cluster the rows of ``x`` into ``k`` groups (k-means++ init, Lloyd's iterations).

    Deterministic for a given ``seed``: ties go to the lowest cluster index, and an empty cluster
    is re-seeded with the point farthest from its centre.

    Args:
        x: ``(N, d)`` points.
        k: Number of clusters, ``1 ≤ k ≤ N``.
        seed: Seed of the k-means++ draws.
        iters: Maximum Lloyd iterations.

    Returns:
        ``(N,)`` cluster index of every row.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise MergeError(f"kmeans: k must be in [1, {n}] for {n} points, got {k}")
    g = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            i = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        else:  # all remaining points coincide with a centre
            i = int(torch.randint(n, (1,), generator=g))
        centers.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centers)
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = assign == j
            if members.any():
                c[j] = x[members].mean(0)
            else:
                far = int(((x - c[assign]) ** 2).sum(1).argmax())
                c[j] = x[far]
                assign[far] = j
    return assign


def lego_module(
    units: torch.Tensor, n_in: int, rank: int, *, seed: int, output_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module's pooled units into rank ``k = min(rank, #units)`` LoRA factors.

    Clusters ``u_i/‖u_i‖`` by :func:`kmeans`, takes each cluster's mean unit and rescales it to the
    cluster's mean norm: ĉ_j = c_j · mean_{i∈C_j}‖u_i‖ / ‖c_j‖.

    Args:
        units: ``(N, n_in + m)`` pooled units of every adapter (from :func:`split_units`).
        n_in: Width of the ``a`` half (the module's input features).
        rank: Target rank k.
        seed: k-means seed.
        output_scale: Multiplies the merged ΔW (the paper's output reweighting; 1 = off).

    Returns:
        ``(B (m × k), A (k × n_in))`` float32 with B·A = output_scale · Σ_j b̂_j âᵀ_j.
    """
    norms = units.norm(dim=1)
    k = min(rank, units.shape[0])
    assign = kmeans(units / norms.clamp_min(1e-30)[:, None], k, seed=seed)
    merged = []
    for j in range(k):
        members = assign == j
        c = units[members].mean(0)
        cn = c.norm()
        merged.append(c * (norms[members].mean() / cn) if cn > 0 else c)
    m = torch.stack(merged)
    root = math.sqrt(abs(output_scale))
    a = m[:, :n_in] * root
    b = m[:, n_in:].T * (root * math.copysign(1.0, output_scale))
    return b.contiguous(), a.contiguous()


def lora_lego(
    adapters: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping]],
    rank: int,
    *,
    seed: int = 0,
    output_scale: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """LoRA-LEGO over peft adapters given as (tensors, adapter_config) pairs.

    Args:
        adapters: Name → (``adapter_model.safetensors`` tensors, ``adapter_config.json``).
        rank: Target rank k of every module (capped by the module's number of units).
        seed: k-means seed (the same seed gives the same adapter).
        output_scale: See :func:`lego_module`.

    Returns:
        (``lora_A``/``lora_B`` tensors keyed like the inputs, module → its rank). The factors are
        meant for an adapter with ``lora_alpha = r`` (scale 1).

    Raises:
        MergeError: No adapters, a bad rank, a lora_A without its lora_B, adapters that target
            other modules or shapes, or of different base models, DoRA adapters or LoRA
            variants other than plain LoRA and rsLoRA.
    """
    if not adapters:
        raise MergeError("LoRA-LEGO needs at least one LoRA adapter")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"LoRA-LEGO: rank must be an int >= 1, got {rank!r}")
    names = list(adapters)
    cfg0 = adapters[names[0]][1]
    for t in names[1:]:
        for field in ("base_model_name_or_path", "fan_in_fan_out", "peft_type"):
            if adapters[t][1].get(field) != cfg0.get(field):
                raise MergeError(
                    f"adapter '{t}' has {field}={adapters[t][1].get(field)!r}, '{names[0]}' has "
                    f"{cfg0.get(field)!r}: adapters of different base models cannot be merged"
                )
    mods = {}
    for t in names:
        mods[t] = lora_modules(*adapters[t], label=f"adapter '{t}'")
        if adapters[t][1].get("use_dora"):
            raise AdapterError(
                f"adapter '{t}' is a DoRA adapter (use_dora): LoRA-LEGO clusters the rank-1 "
                "units of s·B·A and has no merge of DoRA's magnitude vectors; merge DoRA "
                "adapters with task arithmetic (merge_lora_adapters) instead"
            )
    modules = list(mods[names[0]])
    for t in names[1:]:
        if sorted(mods[t]) != sorted(modules):
            diff = sorted(set(mods[t]) ^ set(modules))
            raise MergeError(f"adapter '{t}' targets other modules than '{names[0]}' ('{diff[0]}')")
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for mod in modules:
        first = mods[names[0]][mod]
        for t in names[1:]:
            if (mods[t][mod].a.shape[1], mods[t][mod].b.shape[0]) != (
                first.a.shape[1],
                first.b.shape[0],
            ):
                raise MergeError(
                    f"adapter '{t}': module '{mod}' has other shapes than '{names[0]}'"
                )
        pool = [split_units(mods[t][mod].a, mods[t][mod].b, mods[t][mod].scaling) for t in names]
        b, a = lego_module(
            torch.cat(pool), first.a.shape[1], rank, seed=seed, output_scale=output_scale
        )
        dtype = adapters[names[0]][0][mod + LORA_A].dtype
        out[mod + LORA_A], out[mod + LORA_B] = a.to(dtype), b.to(dtype)
        ranks[mod] = a.shape[0]
    return out, ranks


def write_adapter(
    adapter_dirs: Mapping[str, str | Path],
    out: str | Path,
    rank: int,
    *,
    seed: int = 0,
    output_scale: float = 1.0,
    force: bool = False,
) -> dict:
    """Run :func:`lora_lego` on peft adapter dirs and save the result as a peft adapter.

    Non-LoRA tensors (e.g. ``modules_to_save`` classification heads) are kept when every adapter
    has the same ones, and dropped otherwise (task-specific heads are stored per task by the
    caller; the adapter's ``task_type`` and ``modules_to_save`` are then cleared so peft does not
    expect a head); ``PeftModel.from_pretrained`` loads the result.

    Args:
        adapter_dirs: Name → peft adapter directory (safetensors).
        out: Output adapter directory (written atomically).
        rank: Target rank k.
        seed: k-means seed.
        output_scale: See :func:`lego_module`.
        force: Replace an existing non-empty ``out`` directory or a file there.

    Returns:
        Summary: modules, their ranks, units pooled per module, dropped tensors.

    Raises:
        MergeError: No adapters, or adapters that cannot be merged.
        OutputError: ``out`` would replace an input adapter or existing files (without
            ``force``), or cannot be written (see :func:`mergeflow.io.check_out`).
    """
    from mergeflow.models.lora import read_adapter

    if not adapter_dirs:
        raise MergeError("LoRA-LEGO needs at least one LoRA adapter directory")
    labels = [
        (f"adapter '{t}'" if str(t) != str(d) else "an input adapter", d)
        for t, d in adapter_dirs.items()
    ]
    check_out(out, labels, force=force)
    loaded = {t: read_adapter(d) for t, d in adapter_dirs.items()}
    tensors, ranks = lora_lego(loaded, rank, seed=seed, output_scale=output_scale)
    first = next(iter(loaded))
    sd0 = loaded[first][0]
    extras, dropped = {}, []
    for key, v in sd0.items():
        if is_adapter_tensor(key):
            continue
        same = all(
            key in sd and sd[key].shape == v.shape and torch.equal(sd[key], v)
            for sd, _ in loaded.values()
        )
        (extras.__setitem__(key, v) if same else dropped.append(key))
    cfg = adapter_config(loaded[first][1], ranks, drop_modules_to_save=bool(dropped))
    with atomic_dir(out, replace=force) as tmp:
        save_state_dict({**tensors, **extras}, tmp / "adapter_model.safetensors", {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {
        "adapters": list(adapter_dirs),
        "rank": rank,
        "seed": seed,
        "module_ranks": dict(Counter(ranks.values())),
        "units_pooled": sum(sd[m + LORA_A].shape[0] for sd, _ in loaded.values() for m in ranks),
        "dropped_tensors": dropped,
    }
