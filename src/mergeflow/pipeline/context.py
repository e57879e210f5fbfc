"""What the merge-side stages share: θ_0, task vectors, one head per task, tokenized splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.config import Params
from mergeflow.models.hf import offline_env
from mergeflow.models.inference import Batches, TaskModels
from mergeflow.pipeline.artifacts import load_base_encoder, load_task_vectors, task_batches


@dataclass
class MergeContext:
    """θ_0, τ_t, the experts' task models (for their heads) and the tokenizer."""

    cfg: Params
    tasks: list[str]
    base: dict[str, torch.Tensor]
    task_vectors: dict[str, dict[str, torch.Tensor]]
    models: TaskModels
    tokenizer: object

    @classmethod
    def load(cls, cfg: Params, base_dir: Path, experts_dir: Path, tv_dir: Path) -> MergeContext:
        """Load everything the merge-side stages need for ``cfg.tasks``."""
        offline_env()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tasks = list(cfg.tasks)
        models = {
            t: AutoModelForSequenceClassification.from_pretrained(Path(experts_dir) / t)
            for t in tasks
        }
        return cls(
            cfg=cfg,
            tasks=tasks,
            base=load_base_encoder(base_dir),
            task_vectors=load_task_vectors(tv_dir, tasks),
            models=TaskModels(models, cfg.device),
            tokenizer=AutoTokenizer.from_pretrained(base_dir),
        )

    def batches(self, data_root: Path, split: str) -> dict[str, Batches]:
        """Tokenized ``split`` of every task."""
        return task_batches(
            data_root,
            self.tasks,
            split,
            self.tokenizer,
            self.cfg.base_model.max_length,
            self.cfg.evaluate.batch_size,
        )

    def score(
        self,
        encoder: dict[str, torch.Tensor],
        batches: dict[str, Batches],
        tasks: list[str] | None = None,
    ) -> dict[str, float]:
        """Accuracy per task with ``encoder`` under every task's own head."""
        tasks = tasks or self.tasks
        self.models.set_encoder(encoder, tasks)
        return {t: self.models.accuracy(t, batches[t]) for t in tasks}
