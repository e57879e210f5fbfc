"""Stage ``coefficients``: scaling grid search per merge method, then learned coefficients.

1. For every method in ``evaluate.methods``, θ(λ) = merge(θ_0, {θ_t}; scaling=λ) is scored on the
   validation split of every task and the λ with the best mean accuracy is kept (ties: smaller λ).
   Methods that take TALL λ_t (consensus) get the per-task λ_t the masks stage chose on validation.
2. For every run in ``coefficients.learned`` (AdaMerging, aTLAS, Concrete; see
   :mod:`mergeflow.coefficients`; DAM: :mod:`mergeflow.safety.dam`), α is learned on the data the
   run is allowed to see (unlabeled test inputs, validation, or a seeded stratified k-shot subset
   of validation) and written as
   ``<run>.safetensors`` + ``<run>.png`` (tasks × layers heatmap) + ``<run>.json`` (metadata, data
   consumed, loss curve). ``coefficients.json`` gets one entry per run with ``"learned": <file>``,
   from which the evaluate stage rebuilds the merged encoder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import coefficients as lc
from mergeflow import methods
from mergeflow.config import LearnedCfg, Params
from mergeflow.io import atomic_dir, save_state_dict, write_bytes_atomic, write_json_atomic
from mergeflow.methods.params import check_config
from mergeflow.pipeline.artifacts import experts_from_vectors
from mergeflow.pipeline.context import MergeContext
from mergeflow.progress import stage_progress
from mergeflow.safety.dam import DamResult, DamSpec, dam
from mergeflow.tracking import stage_run


@dataclass(frozen=True)
class Paths:
    """Inputs and outputs (from ``dvc.yaml``)."""

    data: Path
    base: Path
    experts: Path
    task_vectors: Path
    masks: Path
    out: Path
    plot: Path


def method_hyperparams(cfg: Params, name: str, masks_dir: Path) -> dict:
    """The fixed hyperparameters of ``name`` from params, plus λ_t from the masks stage if it takes them."""
    hp = dict(cfg.evaluate.methods[name])
    if "tall_lambda" in methods.get(name).params_model.model_fields and "tall_lambda" not in hp:
        hp["tall_lambda"] = json.loads((Path(masks_dir) / "masks.json").read_text())["lambda"]
    return hp


def _split_digest(data_root: Path, task: str, split: str) -> str:
    meta = json.loads((Path(data_root) / task / "meta.json").read_text())
    return str(meta.get("sha256", {}).get(split, "-"))


class LearnedData:
    """Tokenized splits, loaded once and shared by every learned run."""

    def __init__(self, ctx: MergeContext, data_root: Path):
        self.ctx, self.root, self._cache = ctx, Path(data_root), {}

    def split(self, task: str, split: str) -> lc.Examples:
        """Tokenized ``split`` of ``task`` (cached)."""
        key = (task, split)
        if key not in self._cache:
            self._cache[key] = lc.load_examples(
                self.root, task, split, self.ctx.tokenizer, self.ctx.cfg.base_model.max_length
            )
        return self._cache[key]

    def for_run(self, rc: dict, seed: int) -> tuple[dict, dict | None, list[lc.DataUse]]:
        """(train examples, selection examples, what was consumed) for a resolved run config."""
        train, uses = {}, []
        for t in self.ctx.tasks:
            if rc["data"] == "test_unlabeled":
                train[t] = self.split(t, "test").unlabeled()
                uses.append(lc.DataUse(t, "test", len(train[t]), None, None, labels_used=False))
            elif rc["data"] == "val":
                train[t] = self.split(t, "val")
                uses.append(lc.DataUse(t, "val", len(train[t]), None, None, labels_used=True))
            else:
                val = self.split(t, "val")
                idx = lc.few_shot_indices(val.labels.tolist(), rc["k"], seed)
                train[t] = val.subset(idx)
                uses.append(lc.DataUse(t, "val", len(idx), rc["k"], seed, labels_used=True))
        select = None
        if rc["select"] == "val":
            select = {t: self.split(t, "val") for t in self.ctx.tasks}
            if rc["data"] != "val":
                uses += [
                    lc.DataUse(t, "val", len(select[t]), None, None, labels_used=True)
                    for t in self.ctx.tasks
                ]
        elif rc["select"] == "train_data":
            select = train
        return train, select, uses


def _models(ctx: MergeContext) -> tuple[dict, str]:
    models = ctx.models.models
    prefixes = {m.base_model_prefix for m in models.values()}
    if len(prefixes) != 1:
        raise lc.CoefficientError(f"task models disagree on the encoder prefix: {prefixes}")
    return models, prefixes.pop()


@dataclass(frozen=True)
class Fit:
    """What a learner gets: the functional merge, task models, data and the resolved run config."""

    fm: lc.FunctionalMerge
    models: dict
    prefix: str
    train: dict
    select: dict | None
    reference: dict | None
    ta_scaling: float
    rc: dict
    common: dict
    tokenizer: object = None
    on_step: Callable[[int, float], None] | None = None  # (step, loss) after every step
    on_eval: Callable[[int, float], None] | None = None  # (step, mean normalized) per selection

    @property
    def inputs(self) -> tuple:
        """The positional arguments every learner takes: (fm, models, prefix, train)."""
        return self.fm, self.models, self.prefix, self.train

    def pick(self, *keys: str) -> dict:
        """These keys of the resolved run config, as keyword arguments."""
        return {k: self.rc[k] for k in keys}


def _adamerging(f: Fit):
    return lc.adamerging(*f.inputs, **f.pick("lr", "init"), **f.common, on_step=f.on_step)


def _atlas(f: Fit):
    hp = f.pick("objective", "eval_every", "lr", "weight_decay", "grad_clip", "init")
    return lc.atlas(
        *f.inputs,
        select=f.select,
        reference=f.reference,
        pseudo_threshold=f.rc["pseudo_threshold"],
        **hp,
        **f.common,
        on_step=f.on_step,
        on_eval=f.on_eval,
    )


def _dam(f: Fit):
    init = f.ta_scaling if f.rc["over"] == "task_arithmetic" else f.rc["init"]
    hp = f.pick(
        "over", "lr", "mask_lr", "mask_init", "temperature", "adv_weight", "adv_lr", "trigger",
        "candidates", "flip_threshold", "max_frequency", "trigger_tokens", "quarantine",
    )
    spec = DamSpec(init=init, **hp, **f.common)
    tok = f.tokenizer
    return dam(
        *f.inputs,
        spec,
        special_ids=tok.all_special_ids if tok is not None else (),
        unk_id=tok.unk_token_id if tok is not None and tok.unk_token_id is not None else -1,
        on_step=(lambda step, rec: f.on_step(step, rec["loss"])) if f.on_step else None,
    )


def _concrete(f: Fit):
    hp = f.pick("over", "temperature", "mask_init", "mask_lr", "lr")
    return lc.concrete(*f.inputs, scaling=f.ta_scaling, **hp, **f.common, on_step=f.on_step)


# learned-run method (``coefficients.learned.<run>.method``) -> its learner
LEARNERS = {"adamerging": _adamerging, "atlas": _atlas, "dam": _dam, "concrete": _concrete}


def _word(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(token_id) if tokenizer is not None else str(token_id)


def learn_run(
    name: str,
    lcfg: LearnedCfg,
    ctx: MergeContext,
    data: LearnedData,
    seed: int,
    ta_scaling: float,
    out_dir: Path,
    checkpoint_dir: Path,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> dict:
    """Learn one run's coefficients and write its files into ``out_dir``; return its summary.

    ``on_step(step, loss)`` and ``on_eval(step, mean normalized accuracy)`` are called while the
    run learns (live progress and MLflow curves); DAM reports its total loss, no evaluations.
    """
    rc = lcfg.resolved()
    models, prefix = _models(ctx)
    scheme = lc.BlockScheme(rc["blocks"], rc["partitions"], seed)
    fm = lc.FunctionalMerge(ctx.base, ctx.task_vectors, scheme, ctx.cfg.device)
    train, select, uses = data.for_run(rc, seed)
    reference = None
    if select is not None:  # the normalizer: each expert on the selection data
        reference = {}
        for t in ctx.tasks:
            acc = lc.accuracies(fm, models, prefix, {t: select[t]}, fm.one_hot_alpha(t))
            reference[t] = acc[t]
    common = dict(steps=rc["steps"], batch_size=rc["batch_size"], seed=seed)
    fit = LEARNERS[rc["method"]]
    t0 = time.monotonic()
    try:
        res = fit(
            Fit(fm, models, prefix, train, select, reference, ta_scaling, rc, common, ctx.tokenizer,
                on_step, on_eval)
        )
    except lc.CoefficientDivergence as err:
        ckpt = Path(checkpoint_dir) / f"{name}.last_good.safetensors"
        save_state_dict(err.last_good, ckpt, metadata={"step": str(err.step), "run": name})
        raise lc.CoefficientError(f"learned run {name!r}: {err} → {ckpt}") from None
    seconds = time.monotonic() - t0
    quarantine = getattr(res, "quarantine", None)
    lc.save_learned(out_dir / f"{name}.safetensors", fm, res.alpha, res.mask, quarantine)
    plot = lc.heatmap_png(lc.layer_matrix(res.alpha), out_dir / f"{name}.png")
    kept = None
    if res.mask is not None:
        total = sum(v.numel() for v in res.mask.values())
        kept = sum(float(v.sum()) for v in res.mask.values()) / total
    meta = {
        "run": name,
        "config": rc,
        "seed": seed,
        "device": str(fm.device),
        "tasks": fm.tasks,
        "heatmap": {"file": f"{name}.png", "rows": fm.tasks, "columns": fm.keys, **plot},
        "data": [u.as_dict() for u in uses],
        "losses": res.losses,
        "selection": res.selection,
        "best_step": res.best_step,
        "seconds": seconds,
        "mask_density": kept,
        "concrete_scaling": ta_scaling if rc["method"] in ("concrete", "dam") else None,
    }
    if isinstance(res, DamResult):
        meta["dam"] = {
            "shared_density": res.shared_density,
            "detection_density": res.detection_density,
            "flipped": res.flipped,
            "history": res.history,
            "triggers": {
                t: [
                    {
                        "word": _word(ctx.tokenizer, tr.token_id),
                        "token_id": tr.token_id,
                        "target": tr.target,
                        "flip_rate": tr.flip_rate,
                    }
                    for tr in trs
                ]
                for t, trs in res.triggers.items()
            },
            "quarantined": [_word(ctx.tokenizer, w) for w in quarantine.rows]
            if quarantine is not None
            else [],
        }
    write_json_atomic(out_dir / f"{name}.json", meta)
    return meta


def run(cfg: Params, paths: Paths) -> dict:
    """Search λ per method, learn the configured coefficients; write ``coefficients.json`` + CSV."""
    check_config(cfg)  # the merge methods in params.yaml (see methods.params.check_config)
    ctx = MergeContext.load(cfg, paths.base, paths.experts, paths.task_vectors)
    val = ctx.batches(paths.data, "val")
    experts = experts_from_vectors(ctx.base, ctx.task_vectors)
    learned_cfg = cfg.coefficients.learned if cfg.coefficients.run_learned else {}
    # read by `mergeflow run` (inactive under a bare `dvc repro`): the grid, then each learned run
    progress = stage_progress("coefficients", phases=1 + len(learned_cfg))
    progress.phase("scaling grid", len(cfg.evaluate.methods) * len(cfg.coefficients.grid), "merge")
    result, rows = {}, []
    for name in cfg.evaluate.methods:
        hp = method_hyperparams(cfg, name, paths.masks)
        scores = {}
        # the method runs once; each λ only rebuilds θ_0 + λ·τ_merged (bitwise as merge())
        for lam, merged in methods.merge_grid(name, ctx.base, experts, cfg.coefficients.grid, **hp):
            acc = ctx.score(merged, val)
            del merged
            scores[lam] = sum(acc.values()) / len(acc)
            rows.append({"method": name, "scaling": lam, "val_mean_accuracy": scores[lam]})
            progress.update(len(rows))
        best = max(scores, key=lambda lam: (scores[lam], -lam))
        result[name] = {"scaling": best, "val_mean_accuracy": scores[best], "hyperparams": hp}
    del experts
    ta_scaling = result.get("task_arithmetic", {}).get("scaling", cfg.coefficients.concrete_scaling)
    with stage_run(
        "coefficients",
        {"coefficients": cfg.coefficients.model_dump(), "evaluate.methods": cfg.evaluate.methods},
        inputs={"task_vectors": paths.task_vectors, "masks": paths.masks},
    ) as tr:
        tr.dataset("validation", "-", str(paths.data), "val: grid search of scaling")
        with atomic_dir(paths.out) as tmp:
            consumed: dict[tuple[str, str], dict] = {}
            if learned_cfg:
                torch.manual_seed(cfg.seed)
                data = LearnedData(ctx, paths.data)
                for name, lcfg in learned_cfg.items():
                    progress.phase(f"learn {name}", lcfg.resolved()["steps"])
                    with tr.stream() as live:  # the MLflow curves move while α is learned

                        def on_step(step: int, loss: float, name: str = name) -> None:
                            live.log({f"{name}.loss": loss}, step=step)
                            progress.update(step, loss=loss)

                        def on_eval(step: int, score: float, name: str = name) -> None:
                            live.log({f"{name}.val_mean_normalized": score}, step=step)
                            live.flush()
                            progress.update(step, val_normalized=score)

                        meta = learn_run(
                            name, lcfg, ctx, data, cfg.seed, ta_scaling, tmp, paths.out.parent,
                            on_step=on_step, on_eval=on_eval,
                        )
                    result[name] = {
                        "scaling": "learned",
                        "learned": f"{name}.safetensors",
                        "method": meta["config"]["method"],
                        "hyperparams": {},
                        "data": sorted({f"{u['split']}" for u in meta["data"]}),
                    }
                    for u in meta["data"]:
                        rows_digest = _split_digest(paths.data, u["task"], u["split"])
                        key = (
                            f"{u['task']}/{u['split']}",
                            hashlib.sha256(
                                f"{rows_digest}:{u['k']}:{u['seed']}".encode()
                            ).hexdigest(),
                        )
                        what = "k-shot (stratified) of " if u["k"] else ""
                        use = consumed.setdefault(
                            key,
                            {
                                "source": str(Path(paths.data) / u["task"]),
                                "what": f"{what}{u['split']} n={u['n']} k={u['k']} "
                                f"seed={u['seed']}",
                                "runs": [],
                            },
                        )
                        labels = "labels used" if u["labels_used"] else "labels NOT used"
                        use["runs"].append(f"{name} ({labels})")
                    tr.metrics(
                        {f"{name}.seconds": meta["seconds"], f"{name}.best_step": meta["best_step"]}
                    )
                    for fn in (f"{name}.safetensors", f"{name}.png", f"{name}.json"):
                        tr.artifact(tmp / fn, f"coefficients/{name}")
            # one MLflow input per dataset and run (MLflow keeps the first context of a repeated
            # dataset), so the context names every learned run that consumed those rows
            for (ds_name, digest), use in consumed.items():
                context = f"{', '.join(dict.fromkeys(use['runs']))}: {use['what']}"
                tr.dataset(ds_name, digest, use["source"], context[:500])
            write_json_atomic(tmp / "coefficients.json", result)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["method", "scaling", "val_mean_accuracy"])
        w.writeheader()
        w.writerows(rows)
        write_bytes_atomic(paths.plot, buf.getvalue().encode())
        grid = {m: r for m, r in result.items() if "learned" not in r}
        tr.metrics({f"{m}.scaling": r["scaling"] for m, r in grid.items()})
        tr.metrics({f"{m}.val_mean_accuracy": r["val_mean_accuracy"] for m, r in grid.items()})
        tr.outputs({"coefficients": paths.out})
    return result
