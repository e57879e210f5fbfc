"""Streaming sharded safetensors writer: headers planned up front, tensors written as produced."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import struct
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import torch

from mergeflow.io import write_json_atomic
from mergeflow.io.outputs import exists_message
from mergeflow.tensors import MergeError

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Write tensors, in a fixed order, into Hugging Face-style safetensors shards.

    The tensor list (name, shape, dtype, in write order) is known before merging starts, so every
    shard's header is written first and each tensor's bytes are appended as soon as it is
    computed: memory stays at one tensor. One shard -> ``model.safetensors``; more ->
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.

    Args:
        out_dir: Directory to write into (normally an :func:`~mergeflow.io.atomic_dir`).
        plan: ``(name, shape, dtype)`` in the order tensors will be written.
        max_shard_bytes: Start a new shard when the current one would exceed this.

    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 2 * 1024**3,
    ):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nb = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nb
        n = len(shards)
        if n == 1:
            self.names = ["model.safetensors"]
        else:
            self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._order = [e[0] for e in plan]
        self._expected = {e[0]: (tuple(e[1]), e[2]) for e in plan}
        self._pos = 0
        self._shard = -1
        self._left_in_shard = 0
        self._fh = None
        self.total_size = sum(_nbytes(e[1], e[2]) for e in plan)

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard += 1
        entries = self._shards[self._shard]
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape, dtype in entries:
            nb = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + nb],
            }
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / self.names[self._shard], "wb")  # noqa: SIM115
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._left_in_shard = len(entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must be the next one in the plan, same shape and dtype).

        Raises:
            RuntimeError: Out of order or not matching the plan (a bug in the caller).

        """
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            raise RuntimeError(f"writer: got '{name}' out of order")
        shape, dtype = self._expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer: '{name}' is {tensor.dtype}{tuple(tensor.shape)}")
        if self._left_in_shard == 0:
            self._open_next()
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._left_in_shard -= 1
        self._pos += 1

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded).

        Raises:
            RuntimeError: If not every planned tensor was written.

        """
        if self._pos != len(self._order):
            raise RuntimeError(f"writer: {len(self._order) - self._pos} tensors never written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.names) > 1:
            weight_map = {
                name: self.names[i]
                for i, entries in enumerate(self._shards)
                for name, _, _ in entries
            }
            write_json_atomic(
                self.out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_size}, "weight_map": weight_map},
            )

    def abort(self) -> None:
        """Close the open file without finishing (the caller discards the directory)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def remote_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Objects under the prefix ``root``, relative to it (``""``: an object at ``root`` itself)."""
    fs.invalidate_cache()
    found = [posixpath.relpath(p, root) for p in fs.find(root.rstrip("/") + "/")]
    if fs.isfile(root):
        found.append("")
    return sorted(found)


@contextlib.contextmanager
def remote_output_dir(
    fs: fsspec.AbstractFileSystem, root: str, url: str, *, force: bool, last: Sequence[str]
) -> Iterator[Path]:
    """Build an output directory locally, then publish it under the object-store prefix ``root``.

    Object stores have no rename, so a reader must never see half an output by another rule:
    every file is first uploaded under a temporary sibling prefix ``.<name>.tmp-<pid>-<id>``,
    then copied (server side) into ``root`` with the files named in ``last`` copied last, in that
    order — the shard index (or the single ``model.safetensors``) that makes the directory a
    loadable checkpoint, then the merge manifest. A reader therefore finds no checkpoint until
    every shard is in place. Replacing an existing output (``force``) first removes its
    index / single file / manifest (readers then see no checkpoint rather than a mix), and
    deletes its files that the new output does not have after publishing. The temporary prefix
    and the local staging directory are removed in every case.

    Args:
        fs: The store's filesystem.
        root: Output prefix on ``fs`` (``bucket/key``).
        url: The output as the user wrote it (for messages).
        force: Replace an existing non-empty output.
        last: File names to publish last, in order.

    Yields:
        A local temporary directory to fill.

    Raises:
        MergeError: ``root`` is not empty and ``force`` is off (also re-checked before
            publishing, in case another writer got there first).

    """
    with tempfile.TemporaryDirectory(prefix="mergeflow-out-") as local:
        yield Path(local)
        names = sorted(p.name for p in Path(local).iterdir())
        order = [n for n in names if n not in last] + [n for n in last if n in names]
        parent, name = posixpath.split(root.rstrip("/"))
        stage = posixpath.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            for n in order:
                fs.put_file(os.path.join(local, n), f"{stage}/{n}")
            existing = remote_files(fs, root)
            if existing and not force:
                raise MergeError(remote_exists_message(url, existing))
            if "" in existing:  # an object stored at the output's own key
                fs.rm_file(root)
            for n in last:  # unpublish the old output before its shards change
                if n in existing:
                    fs.rm_file(f"{root}/{n}")
            for n in order:
                fs.copy(f"{stage}/{n}", f"{root}/{n}")
            stale = [f"{root}/{n}" for n in existing if n and n not in order]
            if stale:
                fs.rm(stale)
        finally:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(stage, recursive=True)
            fs.invalidate_cache()


def remote_exists_message(url: str, existing: Sequence[str]) -> str:
    """The refusal for an existing, non-empty object-store ``--out`` (see :func:`remote_files`)."""
    shown = [n or f"an object at {posixpath.basename(url.rstrip('/'))}" for n in existing]
    return exists_message("--out", url, shown)
