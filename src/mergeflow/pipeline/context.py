"""What the merge-side stages share: θ_0, task vectors, one head per task, tokenized splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.config import Params
from mergeflow.models.hf import offline_env
from mergeflow.models.inference import Batches, TaskModels, predict
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
        features: dict[str, list[torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Accuracy per task with ``encoder`` under every task's own head (see :meth:`correct`)."""
        return {
            t: float(c.float().mean()) if len(c) else float("nan")
            for t, c in self.correct(encoder, batches, tasks, features).items()
        }

    def correct(
        self,
        encoder: dict[str, torch.Tensor],
        batches: dict[str, Batches],
        tasks: list[str] | None = None,
        features: dict[str, list[torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-text correctness per task with ``encoder`` under every task's own head.

        Rows are in batch order, the same for every encoder scored on the same ``batches``, so
        two models' vectors pair text by text (paired bootstrap, :mod:`mergeflow.stats`).

        Args:
            encoder: Encoder weights.
            batches: Tokenized batches per task.
            tasks: Tasks to score (default: all).
            features: If given, filled with each task's per-batch mean-pooled last hidden states
                from the same forward passes (what :meth:`pooled_features` computes, for free).
        """
        tasks = tasks or self.tasks
        self.models.set_encoder(encoder, tasks)
        if features is None:
            return {t: self.models.correct(t, batches[t]) for t in tasks}
        from mergeflow.compression.twin import mean_pool

        out = {}
        for t in tasks:
            model, feats = self.models.models[t], features.setdefault(t, [])
            masks = [b.inputs["attention_mask"] for b in batches[t]]  # one encoder call per batch

            def pool(_m, _args, output, masks=masks, feats=feats) -> None:
                mask = masks[len(feats)].to(output[0].device)
                feats.append(mean_pool(output[0], mask).float().cpu())

            hook = model.base_model.register_forward_hook(pool)
            try:
                out[t] = self.models.correct(t, batches[t])
            finally:
                hook.remove()
        return out

    def correct_with_heads(
        self,
        encoder: dict[str, torch.Tensor],
        batches: dict[str, Batches],
        heads: dict[str, dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """:meth:`correct` with other heads (e.g. linear probes on θ_0), experts' heads restored.

        Args:
            encoder: Encoder weights.
            batches: Tokenized batches per task.
            heads: Task -> head tensors under the task model's key names.
        """
        out = {}
        for t in self.tasks:
            model = self.models.models[t]
            own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in heads[t]}
            if set(own) != set(heads[t]):
                raise ValueError(f"head of task {t!r} has keys {sorted(heads[t])}, not {sorted(own)}")
            model.load_state_dict(heads[t], strict=False)
            try:
                out[t] = self.correct(encoder, batches, [t])[t]
            finally:
                model.load_state_dict(own, strict=False)
        return out

    def predictions(
        self, encoder: dict[str, torch.Tensor], batches: Batches, task: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted and true labels of ``task``'s model with ``encoder`` (rows in batch order)."""
        self.models.set_encoder(encoder, [task])
        return predict(self.models.models[task], batches, self.models.device)

    @torch.inference_mode()
    def pooled_features(self, encoder: dict[str, torch.Tensor], batches: Batches) -> torch.Tensor:
        """Mean-pooled last hidden states of ``batches`` under ``encoder`` (rows in batch order)."""
        from mergeflow.compression.twin import mean_pool

        t = self.tasks[0]
        self.models.set_encoder(encoder, [t])
        enc = self.models.models[t].base_model
        out = []
        for b in batches:
            inputs = {k: v.to(self.models.device) for k, v in b.inputs.items()}
            hidden = enc(**inputs).last_hidden_state
            out.append(mean_pool(hidden, inputs["attention_mask"]).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def score_twin(
        self,
        model,
        batches: dict[str, Batches],
        routing: str = "top1",
        features: dict[str, list[torch.Tensor]] | None = None,
    ) -> dict:
        """Accuracy per task of a Twin-Merging model with per-input routing.

        ``top1``: each input is routed to argmax r(x); a batch is split into one group per routed
        task and that task's weights are loaded once per group. ``soft``: each input gets its own
        mixture θ* + Σ_t r_t(x) δ̂_t (one weight build per input: exact but slow). ``features``:
        the router's inputs φ(x) under θ* per task and batch, if already computed (by
        :meth:`score` of the same weights); computed here otherwise.

        Returns:
            ``{"accuracy": {task: acc}, "correct": {task: per-text bool, batch order},
            "routing_accuracy": {task: share routed to itself}}``.
        """
        acc, routed_ok, per_text = {}, {}, {}
        for i, t in enumerate(self.tasks):
            n = self_routed = 0
            rows: list[torch.Tensor] = []
            for j, b in enumerate(batches[t]):
                feats = features[t][j] if features else self.pooled_features(model.shared, [b])
                probs = model.route(feats)
                self_routed += int((probs.argmax(-1) == i).sum())
                if routing == "top1":
                    groups = [
                        (r, (probs.argmax(-1) == r).nonzero().flatten())
                        for r in range(len(self.tasks))
                    ]
                    groups = [(model.expert(model.tasks[r]), idx) for r, idx in groups if len(idx)]
                else:
                    groups = [(model.mixture(p), torch.tensor([j])) for j, p in enumerate(probs)]
                ok = torch.zeros(len(b.labels), dtype=torch.bool)
                for weights, idx in groups:
                    self.models.set_encoder(weights, [t])
                    inputs = {k: v[idx].to(self.models.device) for k, v in b.inputs.items()}
                    pred = self.models.models[t](**inputs).logits.argmax(-1).cpu()
                    ok[idx] = pred == b.labels[idx]
                rows.append(ok)
                n += len(b.labels)
            per_text[t] = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool)
            acc[t], routed_ok[t] = float(per_text[t].float().mean()), self_routed / n
        return {"accuracy": acc, "correct": per_text, "routing_accuracy": routed_ok}
