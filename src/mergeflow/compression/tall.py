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
- ``consensus.safetensors``: only with consensus pruning (``consensus_k``), see below

Consensus pruning (the same paper's consensus mask m_cons = 1[Σ_t m_t ≥ k]): τ_MTL is pruned to
m_cons ⊙ τ_MTL and stored compactly, i.e. only its values where m_cons = 1, in row-major order, plus
m_cons bit-packed. Every task is then reconstructed as θ_t = θ_0 + m_t ⊙ (m_cons ⊙ τ_MTL).
k = 1 is lossless (it drops only weights no task mask selects); k = 2 (the paper's choice) also
drops "selfish" weights that a single task uses, so it trades accuracy for bytes.
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
    check_out,
    file_sha256,
    save_state_dict,
    write_json_atomic,
)
from mergeflow.masks import pack_masks, unpack_bits

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
    consensus_k: int | None = None,
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
        consensus_k: Prune τ_MTL to the consensus mask 1[Σ_t m_t ≥ k] over the archived tasks
            and store it compactly (``None``: dense τ_MTL, no pruning).

    Returns:
        The manifest.

    Raises:
        ArchiveError: A task has a head but no mask, the masks were made for other tensor
            shapes than τ_MTL's, or a bad ``mtl_dtype`` / ``consensus_k``.
    """
    if mtl_dtype not in _DTYPES:
        raise ArchiveError(f"mtl_dtype {mtl_dtype!r} is not one of {sorted(_DTYPES)}")
    if consensus_k is not None and (isinstance(consensus_k, bool) or consensus_k < 1):
        raise ArchiveError(f"consensus_k must be an int >= 1 (or None), got {consensus_k!r}")
    masks = SafetensorsFile(packed_masks_file)
    tasks = sorted({k.split("/", 1)[0] for k in masks.keys()})
    missing = sorted(set(heads) - set(tasks))
    if missing:
        raise ArchiveError(f"{packed_masks_file}: no TALL mask for task(s) {missing}")
    for t in heads:
        for name, v in mtl.items():
            _mask_of(masks, t, name, v.shape, packed_masks_file)
    dtype = _DTYPES[mtl_dtype]
    with atomic_dir(out) as tmp:
        if include_base:
            shutil.copyfile(base_file, tmp / "base.safetensors")
        if consensus_k is None:
            stored = {k: v.to(dtype) for k, v in mtl.items()}
        else:
            cons = {
                name: consensus(masks, sorted(heads), name, v.shape, consensus_k)
                for name, v in mtl.items()
            }
            stored = {k: v.to(dtype)[cons[k]].contiguous() for k, v in mtl.items()}
            packed, meta = pack_masks({"consensus": cons})
            save_state_dict(packed, tmp / "consensus.safetensors", metadata=meta)
        save_state_dict(stored, tmp / "mtl.safetensors", metadata={"kind": "tau_mtl"})
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
            "consensus_k": consensus_k,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _mask_of(
    masks: SafetensorsFile, task: str, name: str, shape: torch.Size, where: str | Path
) -> torch.Tensor:
    """Task ``task``'s mask of tensor ``name``, checked against the tensor's ``shape``."""
    key = f"{task}/{name}"
    if key not in masks:
        raise ArchiveError(f"{where}: mask for tensor {name!r} of task {task!r} is missing")
    recorded = masks.metadata.get(key)
    if recorded is not None and json.loads(recorded) != list(shape):
        raise ArchiveError(
            f"{where}: mask {key!r} was made for shape {json.loads(recorded)}, but the tensor "
            f"has shape {list(shape)}: the masks belong to other models"
        )
    try:
        return unpack_bits(masks.get(key), shape)
    except (ValueError, RuntimeError) as err:
        raise ArchiveError(f"{where}: mask {key!r} does not fit {tuple(shape)}: {err}") from None


def consensus(
    masks: SafetensorsFile, tasks: list[str], name: str, shape: torch.Size, k: int
) -> torch.Tensor:
    """Consensus mask of one tensor over ``tasks``: m_cons = 1[Σ_t m_t ≥ k] (Wang et al., 2024)."""
    count = torch.zeros(shape, dtype=torch.int32)
    for t in tasks:
        count += _mask_of(masks, t, name, shape, masks.path)
    return count >= k


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
    cons = None
    if m.get("consensus_k") is not None:
        cons = SafetensorsFile(archive / "consensus.safetensors")
    for name in base_f.keys():
        b = base_f.get(name)
        if name not in mtl:
            yield name, b
            continue
        mask = _mask_of(masks, task, name, b.shape, archive)
        tau = mtl.get(name)
        if cons is not None:
            keep = _mask_of(cons, "consensus", name, b.shape, archive)
            if tau.shape != (int(keep.sum()),):
                raise ArchiveError(
                    f"{archive}: compact τ_MTL tensor {name!r} has {tau.numel()} values, its "
                    f"consensus mask keeps {int(keep.sum())}: the archive is corrupted"
                )
            full = torch.zeros(b.shape, dtype=tau.dtype)
            full[keep] = tau
            tau = full
        elif tau.shape != b.shape:
            raise ArchiveError(f"{archive}: τ_MTL tensor {name!r} does not match θ_0's shape")
        yield name, (b.float() + mask.float() * tau.float()).to(b.dtype)


def load(
    archive: str | Path, task: str, base: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reconstruct one task's (encoder, head) from the archive.

    The encoder is built tensor by tensor (:func:`iter_task`), so peak memory is about one model
    (θ_t) plus one tensor, whatever the number of tasks in the archive.
    """
    enc = dict(iter_task(archive, task, base))
    head_file = Path(archive) / "heads" / f"{task}.safetensors"
    if not head_file.is_file():
        raise ArchiveError(f"{archive}: the head of task {task!r} is missing ({head_file})")
    return enc, dict(SafetensorsFile(head_file).items())


def export(
    archive: str | Path,
    task: str,
    out: str | Path,
    base_dir: str | Path | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write one reconstructed expert as a Hugging Face model dir (``from_pretrained`` loads it).

    Args:
        archive: Archive directory.
        task: Task to export.
        out: Output model directory (written atomically: on any error nothing is left there).
        base_dir: The base model dir: θ_0 when the archive references it, and the tokenizer
            files copied next to the model. Optional for archives that store θ_0 (then no
            tokenizer is copied).
        force: Replace an existing non-empty ``out`` directory or a file there.

    Returns:
        ``out``.

    Raises:
        ArchiveError: Unknown task, no config for it, θ_0 missing or wrong, corrupted archive.
        OutputError: ``out`` would replace the archive or the base, or existing files (without
            ``force``), or cannot be written (see :func:`mergeflow.io.check_out`).
    """
    check_out(out, {"the archive": archive, "the base": base_dir}, force=force)
    archive = Path(archive)
    m = manifest(archive)
    if task not in m["tasks"]:
        raise ArchiveError(f"{archive}: task {task!r} is not in the archive; has {m['tasks']}")
    cfg_file = archive / "configs" / f"{task}.json"
    if not cfg_file.is_file():
        raise ArchiveError(f"{archive}: no model config for task {task!r}; cannot export it")
    base_dir = Path(base_dir) if base_dir is not None else None
    if base_dir is not None and not base_dir.is_dir():
        raise ArchiveError(f"{base_dir}: base model directory not found")
    base = None if m.get("base_included") or base_dir is None else base_dir / "model.safetensors"
    enc, head = load(archive, task, base)
    prefix = m["encoder_prefix"] + "." if m["encoder_prefix"] else ""
    with atomic_dir(out, replace=force) as tmp:
        save_state_dict(
            {**{prefix + k: v for k, v in enc.items()}, **head},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        shutil.copyfile(cfg_file, tmp / "config.json")
        for f in base_dir.iterdir() if base_dir is not None else ():
            if f.is_file() and ("token" in f.name or f.name in ("vocab.txt", "merges.txt")):
                shutil.copyfile(f, tmp / f.name)
    return Path(out)


def archive_bytes(archive: str | Path) -> int:
    """Bytes on disk of every file in the archive."""
    return sum(f.stat().st_size for f in Path(archive).rglob("*") if f.is_file())
