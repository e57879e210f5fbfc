"""Merge peft LoRA adapters in weight space and save the result as a peft adapter.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) adds
``ΔW = s · B·A`` with ``s = α/r`` (``α/√r`` with rsLoRA). Adapters are merged on the dense ``ΔW``,
never on ``A`` and ``B`` separately ((ΣB)(ΣA) ≠ Σ BA): every module's ``ΔW_t`` is treated as a
task vector over a zero base, merged with any registered method, then re-factored to rank ``r``
by truncated SVD, ``ΔW ≈ U_r Σ_r V_rᵀ``, as ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ`` and
``α = r`` (scale 1). Computation is float32; factors are written in the adapters' dtype.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergeflow import methods
from mergeflow.io import atomic_dir, check_finite, check_out, load_state_dict, save_state_dict
from mergeflow.tensors import MergeError

_A, _B = ".lora_A.weight", ".lora_B.weight"
_F32 = torch.float32


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


def dense_deltas(sd: Mapping[str, torch.Tensor], cfg: Mapping) -> dict[str, torch.Tensor]:
    """Module -> ``s · B·A`` (float32, in ``B·A``'s orientation) of one adapter.

    ``s = α/r`` or ``α/√r`` (rsLoRA); ``α`` from ``alpha_pattern`` when a pattern matches.

    Raises:
        MergeError: A ``lora_A`` without its ``lora_B`` or no LoRA pairs at all.

    """
    pattern = cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in sd.items():
        if not key.endswith(_A):
            continue
        module = key[: -len(_A)]
        if module + _B not in sd:
            raise MergeError(f"LoRA adapter: '{module + _B}' is missing (its lora_A is present)")
        r = a.shape[0]
        alpha = float(cfg.get("lora_alpha", r))
        for pat, val in pattern.items():
            if re.search(pat, module):
                alpha = float(val)
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[module] = s * (sd[module + _B].to(_F32) @ a.to(_F32))
    if not out:
        raise MergeError("LoRA adapter holds no lora_A/lora_B pairs")
    return out


def adapter_config(
    cfg0: Mapping, ranks: Mapping[str, int], *, drop_modules_to_save: bool = False
) -> dict:
    """The peft ``adapter_config.json`` of a merged adapter (α = r per module: scale 1).

    Args:
        cfg0: The first input adapter's config (target modules, task type, ...).
        ranks: Module name → rank of the merged factors; the most common rank becomes ``r``,
            the others go to ``rank_pattern``/``alpha_pattern``.
        drop_modules_to_save: Clear ``modules_to_save``/``task_type`` (when the inputs' heads
            differ, peft's SEQ_CLS task type would insist on a saved head).
    """
    r_main = Counter(ranks.values()).most_common(1)[0][0]
    prefix = "base_model.model."
    cfg = dict(cfg0)
    cfg.update(
        r=r_main,
        lora_alpha=r_main,
        use_rslora=False,
        rank_pattern={m.removeprefix(prefix): r for m, r in ranks.items() if r != r_main},
        alpha_pattern={m.removeprefix(prefix): r for m, r in ranks.items() if r != r_main},
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


def merge_lora_adapters(
    adapters: Mapping[str, str | Path],
    out: str | Path,
    method: str = "task_arithmetic",
    rank: int | None = None,
    force: bool = False,
    **hyperparams: Any,
) -> dict[str, torch.Tensor]:
    """Merge peft LoRA adapters in weight space and save a peft adapter to ``out``.

    Per module: ``ΔW_t = s_t B_t A_t``; ``ΔW = merge(method, 0, {t: ΔW_t})`` (e.g. task
    arithmetic ``λ Σ_t w_t ΔW_t``); then ``B, A = refactor(ΔW, r)``. A single adapter merged
    with task arithmetic at ``scaling=1`` reproduces itself (same ``ΔW``, so the same outputs).
    Tensors other than LoRA factors (e.g. ``modules_to_save`` heads) are copied when identical
    in every adapter.

    Args:
        adapters: Task -> peft adapter directory.
        out: Output adapter directory (written atomically).
        method: Registered merge method applied to the dense ``ΔW``.
        rank: Rank of the saved adapter; default the sum of the input ranks (exact for task
            arithmetic), capped by the matrix size.
        force: Replace an existing non-empty ``out`` directory or a file there.
        **hyperparams: Method hyper-parameters (e.g. ``scaling=1.0``).

    Returns:
        Module -> merged dense ``ΔW`` (float32).

    Raises:
        MergeError: No adapters, different base models / target modules / shapes, differing
            non-LoRA tensors, pickled adapters, or a bad method / hyper-parameter.
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
    deltas = {t: dense_deltas(sd, cfg) for t, (sd, cfg) in loaded.items()}
    modules = list(deltas[first_t])
    for t, d in deltas.items():
        if list(d) != modules:
            diff = sorted(set(d) ^ set(modules))
            raise MergeError(f"adapter '{t}' targets other modules than '{first_t}' ('{diff[0]}')")
    zero = {m: torch.zeros_like(v) for m, v in deltas[first_t].items()}
    merged = methods.merge(method, zero, deltas, **hyperparams)
    extras = {}
    for key, v in sd0.items():
        if key.endswith((_A, _B)):
            continue
        for t, (sd, _) in loaded.items():
            if key not in sd or sd[key].shape != v.shape or not torch.equal(sd[key], v):
                raise MergeError(
                    f"non-LoRA tensor '{key}' differs between adapters '{first_t}' and '{t}' "
                    "(task-specific heads cannot be merged into one adapter)"
                )
        extras[key] = v
    ranks: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    for m, d in merged.items():
        r_in = sum(loaded[t][0][m + _A].shape[0] for t in loaded)
        r = min(rank if rank is not None else r_in, *d.shape)
        b, a = refactor(d, r)
        dtype = sd0[m + _A].dtype
        tensors[m + _A], tensors[m + _B] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        ranks[m] = a.shape[0]
    tensors.update(extras)
    cfg = adapter_config(cfg0, ranks)
    with atomic_dir(out, replace=force) as tmp:
        save_state_dict(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return merged
