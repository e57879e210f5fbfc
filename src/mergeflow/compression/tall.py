"""TALL-mask compression: store θ_0, τ_MTL and one bit per parameter per task.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024):
each expert is reconstructed as θ_t = θ_0 + m_t ⊙ τ_MTL, with m_t the task's TALL mask
m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|]. Storing N experts then costs one multi-task vector and N
bit-packed masks (plus θ_0, which every deployment has anyway) instead of N models.

Archive layout (a directory):

- ``manifest.json``: format, tasks, encoder prefix, θ_0's sha256, τ_MTL dtype
- ``base.safetensors``: θ_0, only when built with ``include_base=True``; otherwise θ_0 is
  referenced by its sha256 and passed to :func:`load` (checked against the manifest)
- ``mtl.safetensors``: τ_MTL (optionally stored in float16/bfloat16)
- ``masks.safetensors``: uint8 bit-packed masks keyed ``<task>/<tensor>``, shapes in its metadata
- ``heads/<task>.safetensors`` and ``configs/<task>.json``: each task's head and model config
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mergeflow.io import (
    SafetensorsFile,
    atomic_dir,
    file_sha256,
    save_state_dict,
    write_json_atomic,
)
from mergeflow.masks import unpack_bits

FORMAT = "mergeflow.tall/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ArchiveError(ValueError):
    """A compressed archive that cannot be read; the message names the file or task."""


def write_archive(
    out: str | Path,
    base_file: str | Path,
    mtl: Mapping[str, torch.Tensor],
    packed_masks_file: str | Path,
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, dict] | None = None,
    *,
    encoder_prefix: str = "",
    mtl_dtype: str = "float32",
    include_base: bool = True,
) -> dict:
    """Write a TALL archive atomically.

    Args:
        out: Archive directory to create (replaced atomically if it exists).
        base_file: θ_0 safetensors (copied byte for byte if ``include_base``; hashed always).
        mtl: τ_MTL = Σ_t τ_t.
        packed_masks_file: The masks stage's bit-packed TALL masks.
        heads: Task → head tensors.
        configs: Task → the task model's ``config.json`` (lets :func:`export` rebuild it).
        encoder_prefix: Key prefix of the encoder in the task models (e.g. ``bert``).
        mtl_dtype: Storage dtype of τ_MTL: ``float32``, ``float16`` or ``bfloat16``.
        include_base: Store θ_0 in the archive, or reference it by sha256.

    Returns:
        The manifest.

    Raises:
        ArchiveError: A task has a head but no mask, or the mask shapes do not fit τ_MTL.
    """
    if mtl_dtype not in _DTYPES:
        raise ArchiveError(f"mtl_dtype {mtl_dtype!r} is not one of {sorted(_DTYPES)}")
    masks = SafetensorsFile(packed_masks_file)
    tasks = sorted({k.split("/", 1)[0] for k in masks.keys()})
    missing = sorted(set(heads) - set(tasks))
    if missing:
        raise ArchiveError(f"{packed_masks_file}: no TALL mask for task(s) {missing}")
    dtype = _DTYPES[mtl_dtype]
    with atomic_dir(out) as tmp:
        if include_base:
            shutil.copyfile(base_file, tmp / "base.safetensors")
        save_state_dict(
            {k: v.to(dtype) for k, v in mtl.items()},
            tmp / "mtl.safetensors",
            metadata={"kind": "tau_mtl"},
        )
        shutil.copyfile(packed_masks_file, tmp / "masks.safetensors")
        (tmp / "heads").mkdir()
        (tmp / "configs").mkdir()
        for t, h in heads.items():
            save_state_dict(h, tmp / "heads" / f"{t}.safetensors", metadata={"task": t})
            if configs and t in configs:
                write_json_atomic(tmp / "configs" / f"{t}.json", configs[t])
        manifest = {
            "format": FORMAT,
            "tasks": sorted(heads),
            "encoder_prefix": encoder_prefix,
            "base_sha256": file_sha256(base_file),
            "base_included": include_base,
            "mtl_dtype": mtl_dtype,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def manifest(archive: str | Path) -> dict:
    """The archive's manifest (checked format)."""
    f = Path(archive) / "manifest.json"
    if not f.is_file():
        raise ArchiveError(f"{archive}: not a TALL archive (no manifest.json)")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError:
        raise ArchiveError(f"{f}: corrupted (not JSON)") from None
    if m.get("format") != FORMAT:
        raise ArchiveError(f"{archive}: unsupported archive format {m.get('format')!r}")
    return m


def tasks_in(archive: str | Path) -> list[str]:
    """Tasks an archive can reconstruct."""
    return list(manifest(archive)["tasks"])


def _base_file(archive: Path, m: dict, base: str | Path | None) -> SafetensorsFile:
    if base is None:
        if not m.get("base_included"):
            raise ArchiveError(
                f"{archive}: θ_0 is not stored in the archive; pass the base model's "
                f"model.safetensors (sha256 {m['base_sha256'][:12]}…)"
            )
        return SafetensorsFile(archive / "base.safetensors")
    base = Path(base)
    if base.is_dir():
        base = base / "model.safetensors"
    got = file_sha256(base)
    if got != m["base_sha256"]:
        raise ArchiveError(
            f"{base}: this is not the base the archive was built on "
            f"(sha256 {got[:12]}…, archive expects {m['base_sha256'][:12]}…)"
        )
    return SafetensorsFile(base)


def iter_task(
    archive: str | Path, task: str, base: str | Path | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield θ_t's encoder tensors one at a time: θ_0 + m_t ⊙ τ_MTL (peak memory ≈ one tensor).

    The sum is computed in float32 and cast to θ_0's dtype.

    Args:
        archive: Archive directory.
        task: Task to reconstruct.
        base: θ_0 (file or model dir) when the archive references it instead of storing it.

    Yields:
        ``(name, tensor)`` in θ_0's key order.

    Raises:
        ArchiveError: Unknown task, wrong base, missing or mis-shaped tensors.
    """
    archive = Path(archive)
    m = manifest(archive)
    if task not in m["tasks"]:
        raise ArchiveError(f"{archive}: task {task!r} is not in the archive; has {m['tasks']}")
    base_f = _base_file(archive, m, base)
    mtl = SafetensorsFile(archive / "mtl.safetensors")
    masks = SafetensorsFile(archive / "masks.safetensors")
    for name in base_f.keys():
        b = base_f.get(name)
        key = f"{task}/{name}"
        if name not in mtl:
            yield name, b
            continue
        if key not in masks:
            raise ArchiveError(f"{archive}: mask for tensor {name!r} of task {task!r} is missing")
        tau = mtl.get(name)
        if tau.shape != b.shape:
            raise ArchiveError(f"{archive}: τ_MTL tensor {name!r} does not match θ_0's shape")
        try:
            mask = unpack_bits(masks.get(key), b.shape)
        except (ValueError, RuntimeError) as err:
            raise ArchiveError(
                f"{archive}: mask {key!r} does not fit {tuple(b.shape)}: {err}"
            ) from None
        yield name, (b.float() + mask.float() * tau.float()).to(b.dtype)


def load(
    archive: str | Path, task: str, base: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reconstruct one task's (encoder, head) from the archive."""
    enc = dict(iter_task(archive, task, base))
    head = dict(SafetensorsFile(Path(archive) / "heads" / f"{task}.safetensors").items())
    return enc, head


def export(archive: str | Path, task: str, out: str | Path, base_dir: str | Path) -> Path:
    """Write one reconstructed expert as a Hugging Face model dir (``from_pretrained`` loads it).

    Args:
        archive: Archive directory.
        task: Task to export.
        out: Output model directory (written atomically).
        base_dir: The base model dir (θ_0 if not in the archive; tokenizer files are copied).

    Returns:
        ``out``.
    """
    archive, base_dir = Path(archive), Path(base_dir)
    m = manifest(archive)
    cfg_file = archive / "configs" / f"{task}.json"
    if not cfg_file.is_file():
        raise ArchiveError(f"{archive}: no model config for task {task!r}; cannot export it")
    base = None if m.get("base_included") else base_dir / "model.safetensors"
    enc, head = load(archive, task, base)
    prefix = m["encoder_prefix"] + "." if m["encoder_prefix"] else ""
    with atomic_dir(out) as tmp:
        save_state_dict(
            {**{prefix + k: v for k, v in enc.items()}, **head},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        shutil.copyfile(cfg_file, tmp / "config.json")
        for f in base_dir.iterdir():
            if f.is_file() and ("token" in f.name or f.name in ("vocab.txt", "merges.txt")):
                shutil.copyfile(f, tmp / f.name)
    return Path(out)


def archive_bytes(archive: str | Path) -> int:
    """Bytes on disk of every file in the archive."""
    return sum(f.stat().st_size for f in Path(archive).rglob("*") if f.is_file())
