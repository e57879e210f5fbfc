"""Learned coefficients on disk (safetensors, never pickle) and a tasks × layers heatmap PNG.

A learned-coefficients file holds ``alpha`` (T × L [× K]) and, for Concrete runs, one bool mask
tensor per encoder key (``mask/<key>``); its header metadata names the block scheme, partitions,
seed, task order and key order, and for DAM the quarantined word-embedding rows. :func:`rebuild`
turns it back into the merged encoder, so the evaluate stage needs only θ_0, the task vectors and
this file.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from mergeflow.coefficients.functional import BlockScheme, CoefficientError, FunctionalMerge
from mergeflow.io import SafetensorsFile, save_state_dict, write_bytes_atomic
from mergeflow.tensors import all_finite


def save_learned(
    path: str | Path,
    fm: FunctionalMerge,
    alpha: torch.Tensor,
    mask: Mapping[str, torch.Tensor] | None = None,
    quarantine=None,
) -> None:
    """Write α (and a binary mask, and DAM's quarantined embedding rows) to re-apply it."""
    if not all_finite(alpha):
        raise CoefficientError("refusing to save non-finite coefficients")
    sd = {"alpha": alpha.detach().float().cpu()}
    for k, v in (mask or {}).items():
        sd[f"mask/{k}"] = (v.detach().cpu() > 0.5).to(torch.bool)
    meta = {
        "format": "mergeflow.learned_coefficients/v1",
        "scheme": fm.scheme.kind,
        "partitions": str(fm.scheme.partitions),
        "seed": str(fm.scheme.seed),
        "tasks": json.dumps(fm.tasks),
        "keys": json.dumps(fm.keys),
    }
    if quarantine is not None and quarantine.rows:
        meta["quarantine"] = json.dumps(
            {"key": quarantine.key, "rows": list(quarantine.rows), "source": quarantine.source}
        )
    save_state_dict(sd, path, metadata=meta)


def load_learned(path: str | Path) -> tuple[BlockScheme, list[str], list[str], torch.Tensor, dict]:
    """(scheme, tasks, keys, α, mask) from a file written by :func:`save_learned`."""
    f = SafetensorsFile(path)
    meta = f.metadata or {}
    if meta.get("format") != "mergeflow.learned_coefficients/v1":
        raise CoefficientError(f"{path}: not a learned-coefficients file")
    scheme = BlockScheme(meta["scheme"], int(meta["partitions"]), int(meta["seed"]))
    mask = {k[len("mask/") :]: f.get(k) for k in f.keys() if k.startswith("mask/")}
    return scheme, json.loads(meta["tasks"]), json.loads(meta["keys"]), f.get("alpha"), mask


@torch.no_grad()
def rebuild(
    base: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | Path,
) -> dict[str, torch.Tensor]:
    """The merged encoder θ(α) described by a learned-coefficients file (dtype of θ_0)."""
    scheme, tasks, keys, alpha, mask = load_learned(path)
    missing = [t for t in tasks if t not in task_vectors]
    if missing:
        raise CoefficientError(f"{path}: learned over tasks {missing} that have no task vector")
    fm = FunctionalMerge(base, {t: task_vectors[t] for t in tasks}, scheme)
    if fm.keys != keys:
        raise CoefficientError(f"{path}: encoder keys differ from those the coefficients fit")
    merged = fm.merged(alpha, {k: v.float() for k, v in mask.items()} if mask else None)
    q = (SafetensorsFile(path).metadata or {}).get("quarantine")
    if q:
        from mergeflow.safety.dam import Quarantine

        spec = json.loads(q)
        if spec["key"] not in merged:
            raise CoefficientError(f"{path}: quarantined rows of unknown tensor {spec['key']!r}")
        quarantine = Quarantine(spec["key"], tuple(spec["rows"]), int(spec["source"]))
        merged = quarantine.apply(merged)
    return {k: v.to(base[k].dtype) for k, v in merged.items()}


def layer_matrix(alpha: torch.Tensor) -> torch.Tensor:
    """α as tasks × blocks (partitions averaged), for plots."""
    a = alpha.detach().float().cpu()
    return a.mean(-1) if a.dim() == 3 else a


def _color(v: float) -> tuple[int, int, int]:
    # A viridis-like ramp (dark purple → teal → yellow) by piecewise-linear interpolation.
    stops = [(0.0, (68, 1, 84)), (0.5, (33, 145, 140)), (1.0, (253, 231, 37))]
    v = min(max(v, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(stops, stops[1:], strict=False):
        if v <= x1:
            w = (v - x0) / (x1 - x0)
            return tuple(int(round(a + w * (b - a))) for a, b in zip(c0, c1, strict=True))
    return stops[-1][1]


def heatmap_png(matrix: torch.Tensor, path: str | Path, cell: tuple[int, int] = (8, 24)) -> dict:
    """Write a tasks × layers heatmap (rows = tasks, columns = blocks) as a PNG, no plotting deps.

    Colours run from the matrix minimum (dark) to its maximum (yellow); the returned dict (also
    useful as metadata) records that range.
    """
    m = matrix.detach().float().cpu()
    lo, hi = float(m.min()), float(m.max())
    span = (hi - lo) or 1.0
    cw, ch = cell
    rows, cols = m.shape
    raw = bytearray()
    for r in range(rows):
        line = bytearray()
        for c in range(cols):
            line += bytes(_color((float(m[r, c]) - lo) / span)) * cw
        for _ in range(ch):
            raw += b"\x00" + line
    w, h = cols * cw, rows * ch

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b"")
    write_bytes_atomic(path, png)
    return {"min": lo, "max": hi, "rows": rows, "cols": cols}
