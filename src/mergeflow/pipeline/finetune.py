"""Stage ``finetune@<task>``: train one expert (full or LoRA) from θ_0 on the task's train split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeflow.config import Params
from mergeflow.data import read_split
from mergeflow.io import atomic_dir, check_finite, write_json_atomic
from mergeflow.models.hf import encoder_prefix, head_module, offline_env, seq_cls_model
from mergeflow.models.inference import accuracy, tokenize
from mergeflow.models.lora import wrap_lora
from mergeflow.models.train import finetune
from mergeflow.pipeline.artifacts import label_names
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    task: str
    data: Path
    base: Path
    out: Path
    metrics: Path


def run(cfg: Params, paths: Paths) -> dict:
    """Fine-tune, score on validation, and save the expert as safetensors + config + tokenizer."""
    offline_env()
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.seed)
    names = label_names(paths.data)
    texts, labels = read_split(paths.data, "train")
    vtexts, vlabels = read_split(paths.data, "val")
    tok = AutoTokenizer.from_pretrained(paths.base)
    model = seq_cls_model(str(paths.base), len(names), names)
    prefix = encoder_prefix(model)
    head_name = next(n for n, m in model.named_children() if m is head_module(model))
    ft = cfg.finetune
    trained = wrap_lora(model, ft.lora, head_name) if ft.mode == "lora" else model
    params = {
        "seed": cfg.seed,
        "finetune": ft.model_dump(),
        "base_model": cfg.base_model.model_dump(),
    }
    with stage_run(
        f"finetune@{paths.task}",
        params,
        inputs={"data": paths.data, "base": paths.base},
        tags={"task": paths.task},
    ) as tr:
        bar = tqdm(total=ft.steps, desc=f"finetune {paths.task}", unit="step")
        res = finetune(
            trained,
            tok,
            texts,
            labels,
            steps=ft.steps,
            batch_size=ft.batch_size,
            lr=ft.lr,
            weight_decay=ft.weight_decay,
            warmup_ratio=ft.warmup_ratio,
            max_length=cfg.base_model.max_length,
            device=cfg.device,
            seed=cfg.seed,
            head_init=ft.head_init,
            probe_epochs=ft.probe_epochs,
            progress=lambda s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
        )
        bar.close()
        for i, loss in enumerate(res.losses):
            tr.metrics({"train_loss": loss}, step=i)
        with atomic_dir(paths.out) as tmp:
            if ft.mode == "lora":
                trained.save_pretrained(tmp / "adapter", safe_serialization=True)
                model = trained.merge_and_unload()
            model = model.to("cpu")
            check_finite(model.state_dict(), f"expert {paths.task} after training")
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            val_acc = accuracy(
                model.to(cfg.device),
                tokenize(tok, vtexts, vlabels, max_length=cfg.base_model.max_length, batch_size=64),
                cfg.device,
            )
            write_json_atomic(
                tmp / "expert.json",
                {
                    "task": paths.task,
                    "encoder_prefix": prefix,
                    "mode": ft.mode,
                    "label_names": list(names),
                    "val_accuracy": val_acc,
                },
            )
        metrics = {
            "val_accuracy": val_acc,
            "final_train_loss": res.losses[-1],
            "probe_train_accuracy": res.probe_train_accuracy,
        }
        write_json_atomic(paths.metrics, metrics)
        tr.metrics(metrics)
        tr.outputs({"expert": paths.out})
    return metrics
