"""Merge peft LoRA and DoRA adapters in weight space and save the result as a peft adapter.

LoRA (Hu et al., ICLR 2022) adds ``ΔW = s·B·A`` with ``s = α/r`` (``α/√r`` with rsLoRA), ``r``
and ``α`` per module resolved from ``rank_pattern``/``alpha_pattern`` as peft resolves them
(:mod:`mergeflow.models.lora`). Adapters are merged on the dense ``ΔW``, never on ``A`` and
``B`` separately ((ΣB)(ΣA) ≠ Σ BA): every module's ``ΔW_t`` is treated as a task vector over a
zero base, merged with any registered method, then re-factored to rank ``r`` by truncated SVD,
``ΔW ≈ U_r Σ_r V_rᵀ``, as ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ`` and ``α = r`` (scale 1).

DoRA (Liu et al., ICML 2024) adapters fine-tune ``W'_t = diag(d_t)(W + ΔW_t)`` with
``d_t = m_t / ‖W + ΔW_t‖_c`` (row norms, as peft's DoRA layer). Their task vectors
``τ_t = W'_t − W`` are full-rank, so they are merged by task arithmetic (the weighted
combination ``τ = λ Σ_t w_t τ_t``; a plain LoRA input counts with ``d_t = 1``), which is again
exactly a DoRA adapter:

    W + τ = diag(D)(W + ΔW*),   D = 1 + λ Σ_t w_t (d_t − 1),   ΔW* = diag(D)⁻¹ λ Σ_t w_t diag(d_t) ΔW_t,

with rank(ΔW*) ≤ Σ_t r_t and magnitude ``m* = D · ‖W + ΔW*‖_c``. Other methods act on
``τ_t`` non-linearly, and their result is not a DoRA adapter: they are refused for DoRA.
Computation is float32; factors are written in the adapters' dtype.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergeflow import methods
from mergeflow.engine.checkpoint import Checkpoint
from mergeflow.io import atomic_dir, check_finite, check_out, load_state_dict, save_state_dict
from mergeflow.models.lora import (
    LORA_A,
    LORA_B,
    MAGNITUDE,
    PEFT_PREFIX,
    AdapterError,
    LoraModule,
    is_adapter_tensor,
    lora_modules,
    orient,
    row_norm,
)
from mergeflow.tensors import MergeError

_F32 = torch.float32
# the magnitude factor D of a merged DoRA row must stay away from 0 (W + τ would lose W there)
_MIN_D = 1e-6


def _read(d: Path) -> tuple[dict[str, torch.Tensor], dict]:
    cfg_p, w_p = d / "adapter_config.json", d / "adapter_model.safetensors"
    if (d / "adapter_model.bin").exists() and not w_p.exists():
        raise MergeError(
            f"{d / 'adapter_model.bin'}: pickled adapters are refused; re-save with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    if not w_p.is_file() or not cfg_p.is_file():
        raise MergeError(f"{d}: not a peft adapter (needs adapter_model.safetensors and config)")
    sd = load_state_dict(w_p)
    check_finite(sd, str(w_p))
    try:
        cfg = json.loads(cfg_p.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{cfg_p}: not valid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise MergeError(f"{cfg_p}: expected a JSON object")
    return sd, cfg


def dense_deltas(
    sd: Mapping[str, torch.Tensor],
    cfg: Mapping,
    base: Mapping[str, torch.Tensor] | Checkpoint | None = None,
    label: str = "LoRA adapter",
) -> dict[str, torch.Tensor]:
    """Module -> task vector ``τ = W' − W`` of one adapter (float32, ``B·A``'s orientation).

    LoRA: ``s·B·A`` with ``s`` from :func:`mergeflow.models.lora.lora_scaling` (peft's
    ``alpha_pattern``/``rank_pattern`` resolution, rsLoRA). DoRA:
    ``m·(W + s·B·A)/‖W + s·B·A‖_c − W``, which needs ``base``.

    Raises:
        MergeError: See :func:`mergeflow.models.lora.lora_modules`; DoRA without ``base``.

    """
    mods = lora_modules(sd, cfg, label)
    out = {}
    for m, mod in mods.items():
        w = None
        if mod.magnitude is not None:
            w = base_weight(base, m, label)
        out[m] = orient(mod.task_vector(w), mod.fan_in_fan_out)
    return out


def base_weight(
    base: Mapping[str, torch.Tensor] | Checkpoint | None, module: str, label: str
) -> torch.Tensor:
    """The base weight ``W`` of adapted ``module`` (as stored in ``base``).

    The module name without peft's prefix (``bert.encoder...``) is tried first, then with its
    leading components dropped (``encoder...``: a base saved as the bare encoder).

    Raises:
        MergeError: No base given, or no matching ``<module>.weight`` in it.

    """
    if base is None:
        raise AdapterError(
            f"{label}: DoRA adapters need the base model (W' = m·(W + s·BA)/‖W + s·BA‖_c "
            "depends on W); pass the base checkpoint"
        )
    parts = (module.removeprefix(PEFT_PREFIX) + ".weight").split(".")
    for i in range(len(parts) - 1):
        name = ".".join(parts[i:])
        if name in base:
            return base.get(name) if isinstance(base, Checkpoint) else base[name]
    raise AdapterError(
        f"{label}: the base model has no weight for DoRA module '{module}' "
        f"(looked for '{'.'.join(parts)}' and its suffixes)"
    )


def adapter_config(
    cfg0: Mapping,
    ranks: Mapping[str, int],
    *,
    drop_modules_to_save: bool = False,
    use_dora: bool = False,
) -> dict:
    """The peft ``adapter_config.json`` of a merged adapter (α = r per module: scale 1).

    Args:
        cfg0: The first input adapter's config (target modules, task type, ...).
        ranks: Module name → rank of the merged factors; the most common rank becomes ``r``,
            the others go to ``rank_pattern``/``alpha_pattern`` as exact, anchored patterns
            (``^`` + the escaped module name), which peft's matcher applies to that module only.
        drop_modules_to_save: Clear ``modules_to_save``/``task_type`` (when the inputs' heads
            differ, peft's SEQ_CLS task type would insist on a saved head).
        use_dora: The merged adapter carries DoRA magnitudes.
    """
    r_main = Counter(ranks.values()).most_common(1)[0][0]
    other = {
        "^" + re.escape(m.removeprefix(PEFT_PREFIX)): r for m, r in ranks.items() if r != r_main
    }
    cfg = dict(cfg0)
    cfg.update(
        r=r_main,
        lora_alpha=r_main,
        use_rslora=False,
        use_dora=use_dora,
        rank_pattern=other,
        alpha_pattern=dict(other),
    )
    if drop_modules_to_save:
        cfg.update(modules_to_save=None, task_type=None)
    return cfg


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``B (m×r)``, ``A (r×n)`` with ``B·A ≈ delta`` (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def dora_pieces(mod: LoraModule, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d − 1, diag(d)·ΔW)`` of one module, ``d = m/‖W + ΔW‖_c`` (1 for plain LoRA).

    ``τ = W' − W = diag(d − 1)·W + diag(d)·ΔW`` is linear in these two pieces, so task
    arithmetic over ``τ_t`` equals task arithmetic over each piece.

    Args:
        mod: The adapted module.
        w: Its base weight ``(out × in)``, float32.
    """
    delta = mod.delta()
    if mod.magnitude is None:
        return torch.zeros(delta.shape[0]), delta
    d = mod.magnitude / row_norm(w + delta)
    return d - 1, d[:, None] * delta


def _merge_dora(
    mods: Mapping[str, Mapping[str, LoraModule]],
    base: Mapping[str, torch.Tensor] | Checkpoint | None,
    method: str,
    hyperparams: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], ...]:
    """Task arithmetic over DoRA (and LoRA) task vectors: module → (τ, ΔW*, D, W), float32.

    See the module docstring for ``D`` and ``ΔW*``; τ, ΔW* and W are in ``B·A``'s orientation.
    """
    if method != "task_arithmetic":
        raise MergeError(
            f"DoRA adapters merge with task_arithmetic only: method '{method}' is not linear "
            "in the task vectors, so its result is not a DoRA adapter (merge_and_unload each "
            "adapter and merge the dense checkpoints instead)"
        )
    first = next(iter(mods))
    weights, pieces = {}, {t: {} for t in mods}
    for m in mods[first]:
        w = orient(
            base_weight(base, m, f"adapter '{first}'").to(_F32), mods[first][m].fan_in_fan_out
        )
        if w.shape != mods[first][m].delta().shape:
            raise MergeError(
                f"DoRA module '{m}': base weight has shape {tuple(w.shape)}, the adapters' B·A "
                f"{tuple(mods[first][m].delta().shape)}"
            )
        weights[m] = w
        for t, ms in mods.items():
            pieces[t][m + "#d"], pieces[t][m + "#dir"] = dora_pieces(ms[m], w)
    zero = {k: torch.zeros_like(v) for k, v in pieces[first].items()}
    comb = methods.merge(method, zero, pieces, **hyperparams)
    taus, deltas, scales = {}, {}, {}
    for m, w in weights.items():
        dd = 1 + comb[m + "#d"]
        small = dd.abs() < _MIN_D
        if small.any():
            raise MergeError(
                f"DoRA module '{m}': output row {int(small.nonzero()[0])} gets magnitude factor "
                f"D = {float(dd[small][0]):.2g} (1 + Σ λ w_t (d_t − 1)): these weights cancel W "
                "there, which no DoRA adapter can express; change the weights"
            )
        deltas[m] = comb[m + "#dir"] / dd[:, None]
        scales[m] = dd
        taus[m] = dd[:, None] * (w + deltas[m]) - w
    return taus, deltas, scales, weights


def merge_lora_adapters(
    adapters: Mapping[str, str | Path],
    out: str | Path,
    method: str = "task_arithmetic",
    rank: int | None = None,
    force: bool = False,
    base: str | Path | Mapping[str, torch.Tensor] | None = None,
    **hyperparams: Any,
) -> dict[str, torch.Tensor]:
    """Merge peft LoRA/DoRA adapters in weight space and save a peft adapter to ``out``.

    LoRA, per module: ``ΔW_t = s_t B_t A_t``; ``ΔW = merge(method, 0, {t: ΔW_t})`` (e.g. task
    arithmetic ``λ Σ_t w_t ΔW_t``); then ``B, A = refactor(ΔW, r)``. DoRA (any input with
    ``use_dora``): task arithmetic over ``τ_t = W'_t − W`` written as a DoRA adapter
    ``(ΔW*, m*)`` (module docstring). A single adapter merged with task arithmetic at
    ``scaling=1`` reproduces itself (same ``W'``, so the same outputs). Tensors other than
    LoRA/DoRA ones (e.g. ``modules_to_save`` heads) are copied when identical in every adapter.

    Args:
        adapters: Task -> peft adapter directory.
        out: Output adapter directory (written atomically).
        method: Registered merge method applied to the dense ``ΔW`` (DoRA: task_arithmetic).
        rank: Rank of the saved adapter; default the sum of the input ranks (exact for task
            arithmetic), capped by the matrix size.
        force: Replace an existing non-empty ``out`` directory or a file there.
        base: The base model (checkpoint dir / ``.safetensors`` file, or a state dict); needed
            for DoRA adapters, whose weights depend on ``W``.
        **hyperparams: Method hyper-parameters (e.g. ``scaling=1.0``, ``weights={...}``).

    Returns:
        Module -> merged dense task vector ``τ`` (float32, ``B·A``'s orientation) before the
        re-factoring to rank ``r``.

    Raises:
        MergeError: No adapters, different base models / target modules / shapes, differing
            non-LoRA tensors, pickled adapters, unsupported LoRA variants, a bad method /
            hyper-parameter, or DoRA adapters with another method or without ``base``.
        OutputError: ``out`` would replace an input adapter or existing files (without
            ``force``), or cannot be written (see :func:`mergeflow.io.check_out`).

    """
    if not adapters:
        raise MergeError("no adapters given: merging needs at least one LoRA adapter")
    check_out(out, {f"adapter '{t}'": p for t, p in adapters.items()}, force=force)
    loaded = {t: _read(Path(p)) for t, p in adapters.items()}
    first_t = next(iter(loaded))
    sd0, cfg0 = loaded[first_t]
    for t, (_, cfg) in loaded.items():
        for field in ("base_model_name_or_path", "fan_in_fan_out", "peft_type"):
            if cfg.get(field) != cfg0.get(field):
                raise MergeError(
                    f"adapter '{t}' has {field}={cfg.get(field)!r}, '{first_t}' has "
                    f"{cfg0.get(field)!r}: adapters of different base models cannot be merged"
                )
    mods = {t: lora_modules(sd, cfg, f"adapter '{t}'") for t, (sd, cfg) in loaded.items()}
    modules = list(mods[first_t])
    for t, ms in mods.items():
        if list(ms) != modules:
            diff = sorted(set(ms) ^ set(modules))
            raise MergeError(f"adapter '{t}' targets other modules than '{first_t}' ('{diff[0]}')")
        for m in modules:
            if ms[m].delta().shape != mods[first_t][m].delta().shape:
                raise MergeError(f"adapter '{t}': module '{m}' has other shapes than '{first_t}'")
    extras = {}
    for key, v in sd0.items():
        if is_adapter_tensor(key):
            continue
        for t, (sd, _) in loaded.items():
            if key not in sd or sd[key].shape != v.shape or not torch.equal(sd[key], v):
                raise MergeError(
                    f"non-LoRA tensor '{key}' differs between adapters '{first_t}' and '{t}' "
                    "(task-specific heads cannot be merged into one adapter)"
                )
        extras[key] = v
    dora = any(mod.magnitude is not None for ms in mods.values() for mod in ms.values())
    if dora:
        if isinstance(base, (str, Path)):
            base = Checkpoint(str(base))
        merged, deltas, scales, weights = _merge_dora(mods, base, method, hyperparams)
    else:
        deltas = {t: {m: mod.delta() for m, mod in ms.items()} for t, ms in mods.items()}
        zero = {m: torch.zeros_like(v) for m, v in deltas[first_t].items()}
        merged = deltas = methods.merge(method, zero, deltas, **hyperparams)
    ranks: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    for m, d in deltas.items():
        r_in = sum(ms[m].a.shape[0] for ms in mods.values())
        r = min(rank if rank is not None else r_in, *d.shape)
        dtype = sd0[m + LORA_A].dtype
        b, a = (f.to(dtype).contiguous() for f in refactor(d, r))
        tensors[m + LORA_A], tensors[m + LORA_B] = a, b
        ranks[m] = a.shape[0]
        if dora:  # m* = D·‖W + B·A‖_c with the factors as stored, so W' = D·(W + B·A) holds
            mag = scales[m] * row_norm(weights[m] + b.to(_F32) @ a.to(_F32))
            tensors[m + MAGNITUDE] = mag.to(sd0.get(m + MAGNITUDE, a).dtype).contiguous()
    tensors.update(extras)
    cfg = adapter_config(cfg0, ranks, use_dora=dora)
    with atomic_dir(out, replace=force) as tmp:
        save_state_dict(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return merged
