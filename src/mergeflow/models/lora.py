"""LoRA experts (peft): training wrapper and the dense task vector ΔW = B·A·α/r.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) trains
W = W_0 + (α/r)·B·A. The task vector of a LoRA expert is therefore the dense product, never A and B
merged separately: (ΣA)(ΣB) ≠ Σ(BA).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mergeflow.config import LoraCfg
from mergeflow.io import load_state_dict
from mergeflow.models.hf import ModelError

_PEFT_PREFIX = "base_model.model."


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


def lora_delta(
    adapter_sd: Mapping[str, torch.Tensor], adapter_config: Mapping, encoder_prefix: str
) -> dict[str, torch.Tensor]:
    """Dense weight deltas of a peft LoRA adapter, keyed like the encoder's state dict.

    ΔW = s · B · A with s = α/r (or α/√r with rsLoRA), transposed for ``fan_in_fan_out`` layers.

    Args:
        adapter_sd: Tensors of ``adapter_model.safetensors``.
        adapter_config: Parsed ``adapter_config.json``.
        encoder_prefix: The encoder's prefix in the task model (e.g. ``bert``).

    Returns:
        Encoder key (e.g. ``encoder.layer.0.attention.self.query.weight``) → ΔW in float32.
    """
    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    out: dict[str, torch.Tensor] = {}
    for key, a in adapter_sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in adapter_sd:
            raise ModelError(f"LoRA adapter: {b_key!r} is missing (its lora_A is present)")
        b = adapter_sd[b_key]
        r = a.shape[0]
        alpha = float(adapter_config.get("lora_alpha", r))
        for pat, val in alpha_pattern.items():
            if re.search(pat, module):
                alpha = float(val)
        s = alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r
        delta = s * (b.float() @ a.float())
        if adapter_config.get("fan_in_fan_out"):
            delta = delta.T
        name = module.removeprefix(_PEFT_PREFIX)
        name = name.removeprefix(encoder_prefix + ".")
        out[name + ".weight"] = delta.contiguous()
    if not out:
        raise ModelError("LoRA adapter holds no lora_A/lora_B pairs")
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
