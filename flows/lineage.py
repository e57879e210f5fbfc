"""After a run: export the best merge as a model directory and register it in MLflow.

What gets registered (decided in docs/orchestration.md): the *merged encoder* of the merge method
with the highest mean normalized test accuracy in ``metrics/eval.json`` (TA/TIES/consensus — the
methods of ``artifacts/coefficients``; TALL masks are a per-task compression, not one model), as a
plain directory a user can load without mergeflow:

    model/encoder.safetensors      θ_merged (the encoder tensors, safetensors)
    model/config.json, tokenizer*  from models/base (AutoModel-loadable with the encoder)
    model/heads/<task>.safetensors one classification head per task, + heads/<task>.json labels
    model/merge.json               method, scaling, hyperparams, tasks, accuracies, dvc.lock md5s
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

CANDIDATE_METRIC = "mean_normalized"


def best_merge(root: Path) -> tuple[str, dict, dict]:
    """(method, its coefficients entry, its eval summary) with the best mean normalized accuracy."""
    evals = json.loads((root / "metrics" / "eval.json").read_text())
    coef = json.loads((root / "artifacts" / "coefficients" / "coefficients.json").read_text())
    from mergeflow import methods

    # merges the registry can rebuild from (scaling, hyperparams); learned-coefficient entries and
    # compressions (TALL, Twin) are not one encoder and are not candidates
    known = set(methods.available())
    candidates = [m for m, c in coef.items() if m in evals and m in known and "scaling" in c]
    if not candidates:
        raise ValueError(f"no merge method of {sorted(coef)} in metrics/eval.json")
    best = max(candidates, key=lambda m: evals[m][CANDIDATE_METRIC])
    return best, coef[best], evals[best]


def export_merged_model(root: Path, dest: Path) -> dict:
    """Write the best merge of the workspace ``root`` as a model directory; returns merge.json."""
    from safetensors.torch import save_file

    from mergeflow import methods
    from mergeflow.pipeline.artifacts import (
        expert_prefix,
        experts_from_vectors,
        load_base_encoder,
        load_expert,
        load_task_vectors,
    )
    from mergeflow.yamlio import load_yaml_file

    params = load_yaml_file(root / "params.yaml")
    tasks = [*params["tasks"], *(params.get("local_tasks") or {})]  # catalogue, then local
    method, coef, summary = best_merge(root)
    base = load_base_encoder(root / "models" / "base")
    tvs = load_task_vectors(root / "artifacts" / "task_vectors", tasks)
    merged = methods.merge(
        method, base, experts_from_vectors(base, tvs), scaling=coef["scaling"], **coef["hyperparams"]
    )
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(dest / "encoder.safetensors"))
    for f in (root / "models" / "base").iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "base.json":
            shutil.copy2(f, dest / f.name)
    (dest / "heads").mkdir(exist_ok=True)
    for t in tasks:
        d = root / "models" / "experts" / t
        _, head = load_expert(d, expert_prefix(d))
        save_file({k: v.contiguous() for k, v in head.items()}, str(dest / "heads" / f"{t}.safetensors"))
        labels = json.loads((d / "expert.json").read_text())["label_names"]
        (dest / "heads" / f"{t}.json").write_text(json.dumps({"label_names": labels}))
    meta = {
        "method": method,
        "scaling": coef["scaling"],
        "hyperparams": coef["hyperparams"],
        "tasks": tasks,
        "mean_accuracy": summary["mean_accuracy"],
        CANDIDATE_METRIC: summary[CANDIDATE_METRIC],
        "accuracy": summary["accuracy"],
        "normalized": summary["normalized"],
    }
    (dest / "merge.json").write_text(json.dumps(meta, indent=2))
    return meta


def register_best_merge(root: Path, parent, model_name: str):
    """Export the best merge and register it: alias ``candidate``, ``champion`` only if better."""
    from mergeflow import tracking

    if not parent.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        meta = export_merged_model(Path(root), Path(tmp) / "model")
        return tracking.register_candidate(
            parent,
            Path(tmp) / "model",
            model_name,
            float(meta[CANDIDATE_METRIC]),
            tags={"method": meta["method"], "scaling": str(meta["scaling"])},
            metric=CANDIDATE_METRIC,
        )
