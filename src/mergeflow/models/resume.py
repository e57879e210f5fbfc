"""Resume points for fine-tuning: model, optimizer, scheduler and RNG state, never pickled.

A resume point is a directory of two files, written atomically (a kill mid-save keeps the
previous point):

- ``state.safetensors``: ``model.<name>`` (every tensor of ``model.state_dict()``),
  ``opt.<param index>.<key>`` (AdamW's ``step``/``exp_avg``/``exp_avg_sq``), ``rng.torch`` (the
  global CPU generator: dropout), ``rng.data`` (the data-order generator) and ``data.order``
  (the current epoch's permutation) and, with validation during training, ``best.<name>`` (the
  weights of the best validation score so far);
- ``state.json``: the step, the position in the permutation, the loss curve so far, the probe's
  accuracy, the validation history and best step, the optimizer's param groups and non-tensor
  state, the LR scheduler's state and a ``fingerprint`` of everything the run depends on (params,
  data and base hashes). A point whose fingerprint differs from the current run's is ignored,
  never resumed.

Restoring it and continuing gives bit-identical weights to an uninterrupted run on the same
hardware (CPU; CUDA kernels may be non-deterministic).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeflow.io import CheckpointError, atomic_dir, load_state_dict, save_state_dict

STATE = "state.safetensors"
META = "state.json"


@dataclass
class TrainState:
    """Everything the training loop needs to continue after ``step`` completed steps."""

    step: int
    pos: int
    order: torch.Tensor
    losses: list[float] = field(default_factory=list)
    probe_train_accuracy: float | None = None
    val_history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best: dict[str, torch.Tensor] | None = None  # weights of the best validation score so far


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def save(
    directory: str | Path,
    fingerprint: str,
    state: TrainState,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    data_gen: torch.Generator,
) -> None:
    """Write a resume point to ``directory`` atomically (replacing the previous one)."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": _cpu(v) for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in osd["state"].items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = _cpu(v)
            else:
                opt_scalars.setdefault(str(idx), {})[key] = v
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_gen.get_state()
    tensors["data.order"] = _cpu(state.order)
    for k, v in (state.best or {}).items():
        tensors[f"best.{k}"] = _cpu(v)
    meta = {
        "fingerprint": fingerprint,
        "step": state.step,
        "pos": state.pos,
        "losses": state.losses,
        "probe_train_accuracy": state.probe_train_accuracy,
        "val_history": [[s, a] for s, a in state.val_history],
        "best_step": state.best_step,
        "param_groups": osd["param_groups"],
        "opt_state_keys": {str(i): sorted(e) for i, e in osd["state"].items()},
        "opt_scalars": opt_scalars,
        "scheduler": sched.state_dict(),
    }
    with atomic_dir(directory) as tmp:
        save_state_dict(tensors, tmp / STATE, metadata={"kind": "mergeflow_resume"})
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")


def load(
    directory: str | Path,
    fingerprint: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    data_gen: torch.Generator,
) -> TrainState | None:
    """Restore a resume point into ``model``/``opt``/``sched``/``data_gen`` and the global RNG.

    Returns:
        The loop state, or ``None`` when there is no point or it belongs to another run
        (different fingerprint).

    Raises:
        CheckpointError: The point is unreadable or does not fit the model (naming the file).
    """
    d = Path(directory)
    if not (d / META).is_file() or not (d / STATE).is_file():
        return None
    try:
        meta = json.loads((d / META).read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{d / META}: not valid JSON; delete {d} to start over") from None
    if meta.get("fingerprint") != fingerprint:
        return None
    sd = load_state_dict(d / STATE)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    msd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    try:
        model.load_state_dict(msd, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{d / STATE}: does not fit the model ({err})") from None
    state: dict[int, dict[str, Any]] = {}
    for idx, keys in meta["opt_state_keys"].items():
        scal = meta["opt_scalars"].get(idx, {})
        state[int(idx)] = {
            k: (sd[f"opt.{idx}.{k}"].to(device) if k not in scal else scal[k]) for k in keys
        }
    fused = any(g.get("fused") or g.get("capturable") for g in meta["param_groups"])
    for entry in state.values():  # AdamW keeps ``step`` on the CPU unless capturable/fused
        if isinstance(entry.get("step"), torch.Tensor):
            entry["step"] = entry["step"].to(device) if fused else entry["step"].cpu()
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(sd["rng.torch"])
    data_gen.set_state(sd["rng.data"])
    best = {k.removeprefix("best."): v.to(device) for k, v in sd.items() if k.startswith("best.")}
    return TrainState(
        step=int(meta["step"]),
        pos=int(meta["pos"]),
        order=sd["data.order"],
        losses=[float(x) for x in meta["losses"]],
        probe_train_accuracy=meta.get("probe_train_accuracy"),
        val_history=[(int(s), float(a)) for s, a in meta.get("val_history", [])],
        best_step=meta.get("best_step"),
        best=best or None,
    )


def discard(directory: str | Path) -> None:
    """Remove a resume point (after the output it leads to was written)."""
    shutil.rmtree(directory, ignore_errors=True)
