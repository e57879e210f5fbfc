"""Bit-packing of boolean masks (8 mask entries per byte, LSB first).

Lets TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024) be stored at 1 bit per parameter, the storage cost the paper reports
for its compression scheme. Layout: the mask is flattened in row-major order and padded with
zeros to a multiple of 8; element ``i`` is bit ``i % 8`` (LSB first) of byte ``i // 8``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from mergeflow.tensors import MergeError, StateDict

__all__ = ["FORMAT", "FORMAT_KEY", "pack_bits", "unpack_bits", "pack_masks", "unpack_masks"]

FORMAT_KEY = "mergeflow.masks.format"
FORMAT = "bitpack-v1-lsb"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask into bytes, ``byte_j = Σ_{b<8} m[8j+b] · 2^b``.

    Storage for TALL masks (Wang et al., "Localizing Task Information for Improved Model
    Merging and Compression", ICML 2024) at one bit per entry.

    Args:
        mask: Bool tensor of any shape (rank 0 included).

    Returns:
        1-D ``torch.uint8`` tensor of ``⌈numel/8⌉`` bytes on ``mask``'s device.

    Raises:
        MergeError: If ``mask`` is not a bool tensor.

    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise MergeError(f"pack_bits expects a bool tensor, got {got}")
    flat = mask.reshape(-1)
    n = flat.numel()
    nbytes = (n + 7) // 8
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=mask.device)
    bits[:n] = flat
    bits = bits.view(nbytes, 8)
    out = bits[:, 0].clone()
    for b in range(1, 8):
        out |= bits[:, b] << b
    return out


def unpack_bits(packed: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``m[i] = (byte_{i//8} >> (i mod 8)) & 1``.

    Args:
        packed: 1-D ``torch.uint8`` tensor from :func:`pack_bits`.
        shape: Shape of the original mask (``()`` for a scalar).

    Returns:
        Bool tensor of ``shape``, exactly the packed mask.

    Raises:
        MergeError: Wrong dtype, or a byte count that does not match ``shape``.

    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise MergeError(f"unpack_bits expects a uint8 tensor, got {got}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise MergeError(f"unpack_bits: invalid shape {shape}")
    n = math.prod(shape)
    flat = packed.reshape(-1)
    if flat.numel() != (n + 7) // 8:
        raise MergeError(
            f"unpack_bits: {flat.numel()} bytes cannot hold shape {shape} "
            f"({n} bits need {(n + 7) // 8} bytes)"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    bits = (flat.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(shape)


def pack_masks(
    masks: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[StateDict, dict[str, str]]:
    """Pack task -> tensor -> bool masks into a flat uint8 state dict plus metadata.

    Each mask becomes ``packed["<task>/<name>"] = pack_bits(mask)``; its shape is stored as
    JSON in ``metadata["<task>/<name>"]`` (e.g. ``"[768, 3072]"``), and
    ``metadata["mergeflow.masks.format"] = "bitpack-v1-lsb"``. Both are safetensors-ready
    (``save_file(packed, path, metadata=metadata)``). Storage scheme for TALL masks, Wang et
    al., "Localizing Task Information for Improved Model Merging and Compression" (ICML 2024).

    Args:
        masks: Task -> tensor name -> bool mask. Task names must not contain ``"/"``.

    Returns:
        ``(packed, metadata)``.

    Raises:
        MergeError: A task name containing ``"/"`` or a non-bool mask (naming it).

    """
    packed: StateDict = {}
    meta: dict[str, str] = {FORMAT_KEY: FORMAT}
    for task, by_name in masks.items():
        if not isinstance(task, str) or "/" in task or not task:
            raise MergeError(f"pack_masks: task name {task!r} must be a non-empty str without '/'")
        for name, m in by_name.items():
            key = f"{task}/{name}"
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise MergeError(f"pack_masks: mask '{name}' of task '{task}' is not a bool tensor")
            packed[key] = pack_bits(m)
            meta[key] = json.dumps(list(m.shape))
    return packed, meta


def unpack_masks(
    packed: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`pack_masks`.

    Keys are split at the first ``"/"`` into task and tensor name; shapes come from
    ``metadata``. Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression" (ICML 2024).

    Args:
        packed: ``"<task>/<name>"`` -> uint8 tensor.
        metadata: The metadata returned by :func:`pack_masks` (extra entries are ignored).

    Returns:
        Task -> tensor name -> bool mask.

    Raises:
        MergeError: Unknown format marker, a key without ``"/"``, missing or malformed shape
            metadata, or a byte count that does not fit the shape (naming the key).

    """
    fmt = metadata.get(FORMAT_KEY)
    if fmt is not None and fmt != FORMAT:
        raise MergeError(f"unpack_masks: unsupported mask format {fmt!r} (expected {FORMAT!r})")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in packed.items():
        task, sep, name = key.partition("/")
        if not sep or not task:
            raise MergeError(f"unpack_masks: key '{key}' is not of the form '<task>/<name>'")
        if key not in metadata:
            raise MergeError(f"unpack_masks: no shape metadata for '{key}'")
        try:
            shape = json.loads(metadata[key])
            ok = isinstance(shape, list) and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MergeError(
                f"unpack_masks: malformed shape metadata for '{key}': {metadata[key]!r}"
            )
        try:
            mask = unpack_bits(tensor, shape)
        except MergeError as exc:
            raise MergeError(f"unpack_masks: '{key}': {exc}") from None
        out.setdefault(task, {})[name] = mask
    return out
