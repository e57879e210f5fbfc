"""Stage ``base``: materialise θ_0 (encoder + tokenizer) from the configured checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeflow.config import Params
from mergeflow.io import atomic_dir, check_finite, write_json_atomic
from mergeflow.models.hf import offline_env, resolve_model_path
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Where the stage writes (from ``dvc.yaml``)."""

    out: Path


def run(cfg: Params, paths: Paths) -> None:
    """Save the base encoder as safetensors so every later stage reads one pinned θ_0."""
    offline_env()
    from transformers import AutoModel, AutoTokenizer

    src = resolve_model_path(cfg.base_model.name_or_path)
    try:
        model = AutoModel.from_pretrained(src)
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as err:
        raise ValueError(
            f"base_model.name_or_path: cannot load {cfg.base_model.name_or_path!r}: {err}"
        ) from None
    check_finite(model.state_dict(), f"base model {src}")
    with stage_run("base", {"base_model": cfg.base_model.model_dump()}) as tr:
        with atomic_dir(paths.out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            write_json_atomic(
                tmp / "base.json",
                {"source": cfg.base_model.name_or_path, "architecture": type(model).__name__},
            )
        tr.metrics({"n_parameters": sum(p.numel() for p in model.parameters())})
        tr.outputs({"base": paths.out})
