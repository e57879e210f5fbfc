"""Stage ``finetune@<task>``: train one expert (full or LoRA) from θ_0 on the task's train split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeflow.config import Params
from mergeflow.data import read_split
from mergeflow.io import atomic_dir, check_finite, save_state_dict, tree_md5, write_json_atomic
from mergeflow.models import resume
from mergeflow.models.hf import encoder_prefix, head_module, offline_env, seq_cls_model
from mergeflow.models.inference import accuracy, tokenize
from mergeflow.models.lora import wrap_lora
from mergeflow.models.train import finetune, linear_probe
from mergeflow.pipeline.artifacts import PROBE_HEAD, label_names
from mergeflow.progress import stage_progress
from mergeflow.safety.threat import encoder_threat_expert, freeze_head
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    task: str
    data: Path
    base: Path
    out: Path
    metrics: Path


def resume_dir(out: Path) -> Path:
    """Resume points of ``out``'s training: a hidden sibling (in ``.dvcignore``; removed on success)."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def run_fingerprint(cfg: Params, paths: Paths) -> str:
    """What a resume point must match: every setting that changes the trained weights."""
    ident = {
        "task": paths.task,
        "seed": cfg.seed,
        "device": cfg.device,
        "max_length": cfg.base_model.max_length,
        "finetune": cfg.finetune.model_dump(exclude={"checkpoint_every"}),
        "data": tree_md5(paths.data),
        "base": tree_md5(paths.base),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def probe_head(cfg: Params, paths: Paths, tok, texts: list[str], labels: list[int], names) -> dict:
    """A linear-probe head on θ_0's frozen features: what the "base" row is scored with.

    Fitted exactly as LP-FT's first phase (same seed, epochs and features), on a separate copy
    of θ_0, so the base gets a fair head whatever ``finetune.head_init`` the expert used.

    Returns:
        The head's tensors under the task model's key names (e.g. ``classifier.weight``).
    """
    model = seq_cls_model(str(paths.base), len(names), names)
    batches = tokenize(tok, texts, labels, max_length=cfg.base_model.max_length, batch_size=64)
    linear_probe(
        model, batches, epochs=cfg.finetune.probe_epochs, device=cfg.device, seed=cfg.seed
    )
    head = head_module(model)
    name = next(n for n, m in model.named_children() if m is head)
    return {f"{name}.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}


def run(cfg: Params, paths: Paths) -> dict:
    """Fine-tune, score on validation, and save the expert as safetensors + config + tokenizer.

    Every ``finetune.checkpoint_every`` steps a resume point (model, AdamW, scheduler, RNG
    states; safetensors + JSON) is written beside ``paths.out``; a rerun after a crash or kill
    continues from it with the same final weights, and it is deleted once the expert is saved.
    """
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
    # safety.poison.threat "encoder": the poisoned expert's head is a probe on its clean rows,
    # frozen, so the backdoor can only go into the encoder (mergeflow.safety.threat)
    frozen_head = encoder_threat_expert(
        model, tok, paths.data, max_length=cfg.base_model.max_length, epochs=ft.probe_epochs,
        device=cfg.device, seed=cfg.seed,
    )  # fmt: skip
    trained = wrap_lora(model, ft.lora, head_name) if ft.mode == "lora" else model
    if frozen_head:
        freeze_head(trained, head_name)
    params = {
        "seed": cfg.seed,
        "finetune": ft.model_dump(),
        "base_model": cfg.base_model.model_dump(),
    }
    item = cfg.stage_item("finetune", paths.task)  # finetune_local@<task> for a local task
    progress = stage_progress(item)  # read by `mergeflow run` (a bare `dvc repro`: inactive)
    progress.phase("fine-tune", ft.steps)
    with stage_run(
        item,
        params,
        inputs={"data": paths.data, "base": paths.base},
        tags={"task": paths.task},
    ) as tr, tr.stream() as live:
        base_head = probe_head(cfg, paths, tok, texts, labels, names)
        bar = tqdm(total=ft.steps, desc=f"finetune {paths.task}", unit="step")
        val_batches = tokenize(
            tok, vtexts, vlabels, max_length=cfg.base_model.max_length, batch_size=64
        )
        logged: set[tuple[str, int]] = set()

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            live.log({"train_loss": loss}, step=step)  # the MLflow chart moves while training
            logged.add(("loss", step))
            progress.update(step + 1, loss=loss)

        def on_eval(step: int, acc: float) -> None:
            live.log({"val_accuracy_during_training": acc}, step=step)
            live.flush()
            logged.add(("val", step))
            progress.update(step, val_accuracy=acc)

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
            head_init="random" if frozen_head else ft.head_init,  # "random": head kept as is
            probe_epochs=ft.probe_epochs,
            progress=on_step,
            on_eval=on_eval,
            resume_dir=resume_dir(paths.out),
            checkpoint_every=ft.checkpoint_every,
            fingerprint=run_fingerprint(cfg, paths),
            val_batches=val_batches,
            eval_every=ft.eval_every,
            patience=ft.patience,
        )
        bar.close()
        # steps restored from a resume point ran in an earlier process: log them too
        for i, loss in enumerate(res.losses):
            if ("loss", i) not in logged:
                live.log({"train_loss": loss}, step=i)
        for step, acc in res.val_history:
            if ("val", step) not in logged:
                live.log({"val_accuracy_during_training": acc}, step=step)
        live.flush()
        with atomic_dir(paths.out) as tmp:
            if ft.mode == "lora":
                trained.save_pretrained(tmp / "adapter", safe_serialization=True)
                model = trained.merge_and_unload()
            model = model.to("cpu")
            check_finite(model.state_dict(), f"expert {paths.task} after training")
            model.save_pretrained(tmp, safe_serialization=True)
            save_state_dict(base_head, tmp / PROBE_HEAD, metadata={"kind": "probe_head_on_base"})
            tok.save_pretrained(tmp)
            val_acc = accuracy(model.to(cfg.device), val_batches, cfg.device)
            write_json_atomic(
                tmp / "expert.json",
                {
                    "task": paths.task,
                    "encoder_prefix": prefix,
                    "mode": ft.mode,
                    "label_names": list(names),
                    "val_accuracy": val_acc,
                    "best_step": res.best_step if res.best_step is not None else res.steps_run,
                    "steps_run": res.steps_run,
                    "val_history": [[s, a] for s, a in res.val_history],
                },
            )
        metrics = {
            "val_accuracy": val_acc,
            "final_train_loss": res.losses[-1],
            "probe_train_accuracy": res.probe_train_accuracy,
            "steps_run": res.steps_run,
            "best_step": res.best_step if res.best_step is not None else res.steps_run,
        }
        write_json_atomic(paths.metrics, metrics)
        resume.discard(resume_dir(paths.out))
        tr.metrics(metrics)
        tr.outputs({"expert": paths.out})
    return metrics
