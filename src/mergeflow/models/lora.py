r"""peft LoRA and DoRA adapters: training wrapper, per-module factors and dense task vectors.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) trains
``W' = W + s·B·A`` with ``s = α/r``; rsLoRA (Kalajdzievski, "A Rank Stabilization Scaling Factor
for Fine-Tuning with LoRA", 2023) uses ``s = α/√r``. DoRA (Liu et al., "DoRA: Weight-Decomposed
Low-Rank Adaptation", ICML 2024, eq. 5) trains a magnitude vector ``m`` as well:

    W' = m · (W + s·B·A) / ‖W + s·B·A‖_c,

where ``‖·‖_c`` is, as in peft's ``DoraLinearLayer.get_weight_norm``, the L2 norm of each output
row of the ``(out × in)`` weight (one entry of ``m`` per output feature). The task vector of an
adapter is the dense ``τ = W' − W`` (for plain LoRA ``s·B·A``), never A and B merged separately:
(ΣB)(ΣA) ≠ Σ BA.

Per-module ``r`` and ``α`` come from ``rank_pattern``/``alpha_pattern`` resolved exactly as peft
resolves them (:func:`pattern_key`): keys are matched against the module name *without* peft's
``base_model.model.`` prefix, as ``re.match(rf"(.*\.)?({key})$", name)``, and the first key
that matches (in the config's order) wins. This is the one implementation every caller uses:
the pipeline's task vectors (:func:`lora_delta`), ``merge_lora_adapters`` and LoRA-LEGO.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.config import LoraCfg
from mergeflow.io import load_state_dict
from mergeflow.models.hf import ModelError
from mergeflow.tensors import MergeError

PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B, MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
_F32 = torch.float32
# adapter_config.json fields of peft LoRA variants whose weights are not W + s·B·A (or DoRA's
# form of it): merging them as plain LoRA would be silently wrong, so they are refused.
_UNSUPPORTED = (
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "layer_replication",
    "use_bdlora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "trainable_token_indices",
)


class AdapterError(ModelError, MergeError):
    """A peft adapter that cannot be read or merged; the message names the adapter and field."""


def wrap_lora(model, cfg: LoraCfg, head_name: str):
    """Wrap a sequence classifier with LoRA adapters; its head stays fully trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=[head_name],
    )
    return get_peft_model(model, config)


def pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    r"""The ``rank_pattern``/``alpha_pattern`` key that applies to module ``key``, peft's way.

    Mirrors ``peft.utils.other.get_pattern_key`` (peft 0.21, not part of peft's public API):
    the first pattern ``p`` with ``re.match(rf"(.*\.)?({p})$", key)`` wins; ``key`` itself
    when none matches (so ``patterns.get(result, default)`` gives the default).

    Args:
        pattern_keys: The pattern dict's keys, in the config's order.
        key: Module name without peft's ``base_model.model.`` prefix.
    """
    for p in pattern_keys:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def rank_alpha(cfg: Mapping, module: str) -> tuple[int, float]:
    """``(r, α)`` of one module as peft's ``LoraModel._create_and_replace`` sets them.

    Args:
        cfg: Parsed ``adapter_config.json``.
        module: Module name as in the adapter file (``base_model.model.`` prefix optional).
    """
    key = module.removeprefix(PEFT_PREFIX)
    ranks = cfg.get("rank_pattern") or {}
    alphas = cfg.get("alpha_pattern") or {}
    r = ranks.get(pattern_key(ranks, key), cfg.get("r", 8))
    return int(r), float(alphas.get(pattern_key(alphas, key), cfg.get("lora_alpha", 8)))


def lora_scaling(cfg: Mapping, module: str) -> float:
    """``s = α/r`` (``α/√r`` with ``use_rslora``), as peft's ``LoraLayer.update_layer``."""
    r, alpha = rank_alpha(cfg, module)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: factors, scale and (DoRA) magnitude, float32.

    Attributes:
        name: Module name as in the adapter file (with peft's prefix).
        a: ``lora_A`` (r × in).
        b: ``lora_B`` (out × r).
        scaling: ``s`` (:func:`lora_scaling`).
        magnitude: DoRA's ``m`` (one per output feature), ``None`` for plain LoRA.
        fan_in_fan_out: The base weight is stored ``(in × out)`` (e.g. GPT-2's ``Conv1D``).
    """

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        """``s·B·A`` in the ``(out × in)`` orientation."""
        return self.scaling * (self.b @ self.a)

    def task_vector(self, weight: torch.Tensor | None) -> torch.Tensor:
        """``τ = W' − W`` in the base weight's own orientation (float32).

        Args:
            weight: The base weight ``W`` as stored in the base model; needed for DoRA only.

        Raises:
            AdapterError: A DoRA module without its base weight, or of another shape.
        """
        delta = self.delta()
        if self.magnitude is not None:
            if weight is None:
                raise AdapterError(
                    f"DoRA module '{self.name}': its task vector needs the base weight W "
                    "(W' = m·(W + s·BA)/‖W + s·BA‖_c); give the base model"
                )
            w = orient(weight.to(_F32), self.fan_in_fan_out)
            if w.shape != delta.shape:
                raise AdapterError(
                    f"DoRA module '{self.name}': base weight has shape {tuple(w.shape)}, "
                    f"the adapter's B·A {tuple(delta.shape)}"
                )
            delta = dora_weight(w, delta, self.magnitude) - w
        return orient(delta, self.fan_in_fan_out)


def orient(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``(out × in)`` ↔ stored orientation (a transpose for ``fan_in_fan_out`` layers)."""
    return w.T if fan_in_fan_out else w


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """‖W‖_c of DoRA: the L2 norm of each output row of an ``(out × in)`` weight."""
    return torch.linalg.norm(w, dim=1)


def dora_weight(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's fine-tuned weight ``m · (W + ΔW) / ‖W + ΔW‖_c`` (Liu et al., ICML 2024, eq. 5).

    Args:
        w: Base weight ``(out × in)``.
        delta: ``s·B·A`` ``(out × in)``.
        magnitude: ``m`` (``out``).
    """
    v = w + delta
    return (magnitude.to(_F32) / row_norm(v))[:, None] * v


def check_supported(cfg: Mapping, label: str) -> None:
    """Refuse adapters that are not peft LoRA/DoRA of the kind merged here.

    Raises:
        AdapterError: Another ``peft_type`` or a LoRA variant listed in ``_UNSUPPORTED``.
    """
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{label}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for field in _UNSUPPORTED:
        if cfg.get(field):
            raise AdapterError(
                f"{label}: adapter_config sets {field}={cfg[field]!r}, a peft LoRA variant "
                "that is not merged here (only plain LoRA, rsLoRA and DoRA are)"
            )


def lora_modules(
    sd: Mapping[str, torch.Tensor], cfg: Mapping, label: str = "LoRA adapter"
) -> dict[str, LoraModule]:
    """Every adapted module of one peft adapter, in file order.

    Args:
        sd: Tensors of ``adapter_model.safetensors``.
        cfg: Parsed ``adapter_config.json``.
        label: How messages name the adapter.

    Raises:
        AdapterError: A ``lora_A`` without its ``lora_B``, a DoRA adapter without magnitudes (or
            magnitudes without ``use_dora``), factors whose rank differs from the config's,
            adapter tensors of another kind (embedding/conv LoRA), or no LoRA pairs at all.
    """
    check_supported(cfg, label)
    dora = bool(cfg.get("use_dora"))
    fifo = bool(cfg.get("fan_in_fan_out"))
    out: dict[str, LoraModule] = {}
    for key, a in sd.items():
        if key.endswith((LORA_B, MAGNITUDE)):
            continue
        if not key.endswith(LORA_A):
            if ".lora_" in key:
                raise AdapterError(
                    f"{label}: tensor '{key}' is a kind of LoRA tensor not merged here (only "
                    "linear layers' lora_A/lora_B and DoRA magnitudes are)"
                )
            continue
        module = key[: -len(LORA_A)]
        if module + LORA_B not in sd:
            raise AdapterError(f"{label}: '{module + LORA_B}' is missing (its lora_A is present)")
        b = sd[module + LORA_B]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"{label}: module '{module}' has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, not the factors of a linear layer"
            )
        r, _ = rank_alpha(cfg, module)
        if r != a.shape[0]:
            raise AdapterError(
                f"{label}: module '{module}' has rank {a.shape[0]}, but its adapter_config "
                f"(r / rank_pattern) gives {r}"
            )
        mag = sd.get(module + MAGNITUDE)
        if dora and mag is None:
            raise AdapterError(f"{label}: use_dora is set but '{module + MAGNITUDE}' is missing")
        if mag is not None and not dora:
            raise AdapterError(
                f"{label}: '{module + MAGNITUDE}' is a DoRA magnitude, but "
                "use_dora is not set in adapter_config.json"
            )
        if mag is not None and mag.shape != (b.shape[0],):
            raise AdapterError(
                f"{label}: DoRA magnitude '{module + MAGNITUDE}' has shape {tuple(mag.shape)}, "
                f"expected ({b.shape[0]},)"
            )
        out[module] = LoraModule(
            module,
            a.to(_F32),
            b.to(_F32),
            lora_scaling(cfg, module),
            None if mag is None else mag.to(_F32),
            fifo,
        )
    if not out:
        raise AdapterError(f"{label} holds no lora_A/lora_B pairs")
    return out


def is_adapter_tensor(key: str) -> bool:
    """A LoRA/DoRA tensor (merged by this module) rather than e.g. a ``modules_to_save`` head."""
    return key.endswith((LORA_A, LORA_B, MAGNITUDE))


def lora_delta(
    adapter_sd: Mapping[str, torch.Tensor],
    adapter_config: Mapping,
    encoder_prefix: str,
    base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Dense task vectors ``τ = W' − W`` of a peft LoRA/DoRA adapter, keyed like the encoder.

    LoRA: ``τ = s·B·A``; DoRA: ``τ = m·(W + s·B·A)/‖W + s·B·A‖_c − W`` (see the module doc);
    transposed for ``fan_in_fan_out`` layers.

    Args:
        adapter_sd: Tensors of ``adapter_model.safetensors``.
        adapter_config: Parsed ``adapter_config.json``.
        encoder_prefix: The encoder's prefix in the task model (e.g. ``bert``).
        base: The base encoder's state dict (encoder keys); required for DoRA adapters.

    Returns:
        Encoder key (e.g. ``encoder.layer.0.attention.self.query.weight``) → τ in float32.

    Raises:
        AdapterError: See :func:`lora_modules`; a DoRA adapter without ``base`` or whose module
            is not in it.
    """
    out: dict[str, torch.Tensor] = {}
    for module, mod in lora_modules(adapter_sd, adapter_config).items():
        name = module.removeprefix(PEFT_PREFIX).removeprefix(encoder_prefix + ".") + ".weight"
        weight = None
        if mod.magnitude is not None:
            if base is None or name not in base:
                raise AdapterError(
                    f"DoRA module '{module}': the base encoder has no '{name}' "
                    "(DoRA's task vector needs the base weight)"
                )
            weight = base[name]
        out[name] = mod.task_vector(weight).contiguous()
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``adapter_model.safetensors`` and ``adapter_config.json`` from a peft adapter dir."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not w_path.is_file():
        raise ModelError(f"{d}: no adapter_model.safetensors (peft adapters must be safetensors)")
    if not cfg_path.is_file():
        raise ModelError(f"{d}: no adapter_config.json")
    return load_state_dict(w_path), json.loads(cfg_path.read_text())
