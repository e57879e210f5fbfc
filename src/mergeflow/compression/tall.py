"""TALL-mask compression: store θ_0, τ_MTL and one bit per parameter per task.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024):
each expert is reconstructed as θ_t = θ_0 + m_t ⊙ τ_MTL, with m_t the task's TALL mask. Storing N
experts then costs one base, one multi-task vector and N bit-packed masks instead of N models.

Archive layout (a directory): ``base.safetensors`` (θ_0), ``mtl.safetensors`` (τ_MTL),
``masks.safetensors`` (uint8 bit-packed masks keyed ``<task>/<tensor>``, shapes in its metadata),
``heads/<task>.safetensors`` (each task's classifier head), ``manifest.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mergeflow.io import SafetensorsFile, atomic_dir, save_state_dict, write_json_atomic
from mergeflow.masks import unpack_bits

FORMAT = "mergeflow.tall/1"


class ArchiveError(ValueError):
    """A compressed archive that cannot be read; the message names the file or task."""


def write_archive(
    out: str | Path,
    base_file: str | Path,
    mtl: Mapping[str, torch.Tensor],
    packed_masks_file: str | Path,
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    extra: Mapping | None = None,
) -> dict:
    """Write a TALL archive atomically.

    Args:
        out: Archive directory to create (replaced atomically if it exists).
        base_file: θ_0 safetensors (copied byte for byte).
        mtl: τ_MTL.
        packed_masks_file: The masks stage's bit-packed TALL masks.
        heads: Task → head tensors.
        extra: More manifest fields.

    Returns:
        The manifest.
    """
    masks = SafetensorsFile(packed_masks_file)
    tasks = sorted({k.split("/", 1)[0] for k in masks.keys()})
    missing = sorted(set(heads) - set(tasks))
    if missing:
        raise ArchiveError(f"no TALL mask for task(s) {missing}")
    with atomic_dir(out) as tmp:
        shutil.copyfile(base_file, tmp / "base.safetensors")
        save_state_dict(mtl, tmp / "mtl.safetensors", metadata={"kind": "tau_mtl"})
        shutil.copyfile(packed_masks_file, tmp / "masks.safetensors")
        (tmp / "heads").mkdir()
        for t, h in heads.items():
            save_state_dict(h, tmp / "heads" / f"{t}.safetensors", metadata={"task": t})
        manifest = {"format": FORMAT, "tasks": sorted(heads), **(extra or {})}
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _manifest(archive: Path) -> dict:
    f = archive / "manifest.json"
    if not f.is_file():
        raise ArchiveError(f"{archive}: not a TALL archive (no manifest.json)")
    m = json.loads(f.read_text())
    if m.get("format") != FORMAT:
        raise ArchiveError(f"{archive}: unsupported archive format {m.get('format')!r}")
    return m


def tasks_in(archive: str | Path) -> list[str]:
    """Tasks an archive can reconstruct."""
    return list(_manifest(Path(archive))["tasks"])


def iter_task(archive: str | Path, task: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield θ_t's encoder tensors one at a time: θ_0 + m_t ⊙ τ_MTL (peak memory ≈ one tensor)."""
    archive = Path(archive)
    if task not in tasks_in(archive):
        raise ArchiveError(
            f"{archive}: task {task!r} is not in the archive; has {tasks_in(archive)}"
        )
    base = SafetensorsFile(archive / "base.safetensors")
    mtl = SafetensorsFile(archive / "mtl.safetensors")
    masks = SafetensorsFile(archive / "masks.safetensors")
    for name in base.keys():
        b = base.get(name)
        key = f"{task}/{name}"
        if name not in mtl:
            yield name, b
            continue
        if key not in masks:
            raise ArchiveError(f"{archive}: mask for tensor {name!r} of task {task!r} is missing")
        m = unpack_bits(masks.get(key), b.shape)
        tau = mtl.get(name)
        if tau.shape != b.shape or m.shape != b.shape:
            raise ArchiveError(f"{archive}: tensor {name!r} has mismatched shapes in the archive")
        yield name, (b.float() + m.float() * tau.float()).to(b.dtype)


def load(archive: str | Path, task: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reconstruct one task's (encoder, head) from the archive."""
    enc = dict(iter_task(archive, task))
    head = dict(SafetensorsFile(Path(archive) / "heads" / f"{task}.safetensors").items())
    return enc, head


def archive_bytes(archive: str | Path) -> int:
    """Bytes on disk of every file in the archive."""
    return sum(f.stat().st_size for f in Path(archive).rglob("*") if f.is_file())
