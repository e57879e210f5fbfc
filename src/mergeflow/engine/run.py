"""The streaming merge: checkpoints in, sharded safetensors out, bounded memory."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from mergeflow import methods  # noqa: F401  (registers the methods)
from mergeflow.io import atomic_dir, check_out
from mergeflow.methods.chunks import TensorInputs
from mergeflow.methods.merging import assemble_tensor, prepare, resolve, scaling_of, tensor_delta
from mergeflow.remote import object_store_errors
from mergeflow.tensors import MergeError, all_finite, is_mergeable

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, check_same_architecture
from .writer import ShardedWriter, remote_exists_message, remote_files, remote_output_dir

_F32 = torch.float32
META_NAME = "mergeflow_merge.json"


@dataclass
class MergeReport:
    """What a merge did.

    Attributes:
        out: Output directory.
        method: Method name.
        params: Validated hyper-parameters.
        merged: Names of merged (floating-point) tensors.
        copied: Names of tensors copied verbatim from the base (integer/bool buffers).
        side_files: Non-weight files copied from the base directory (config, tokenizer, …).
        bytes_read: Tensor bytes read from storage (all passes).
        seconds: Wall time.
        passes: Streaming passes over the inputs (1 + statistics passes).

    """

    out: str
    method: str
    params: dict[str, Any]
    merged: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    side_files: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    passes: int = 1


class _Reader:
    """The checkpoints as a :class:`~mergeflow.methods.chunks.Source`.

    Reads tensors (from any thread), checks that they are finite, counts the bytes read.
    """

    def __init__(self, base: Checkpoint, experts: Mapping[str, Checkpoint]):
        self.base = base
        self.experts = experts
        self.tasks = list(experts)
        self.names = [k for k in base.keys() if base.dtype(k).is_floating_point]
        self.passes = 0
        self._lock = threading.Lock()
        self.bytes = 0

    def read(self, ck: Checkpoint, label: str, name: str) -> torch.Tensor:
        t = ck.get(name)
        with self._lock:
            self.bytes += t.numel() * t.element_size()
        if not all_finite(t):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise MergeError(
                f"{label} ({ck.file_of(name)}): tensor '{name}' contains non-finite values "
                f"({n_nan} NaN, {n_inf} Inf)"
            )
        return t

    def base_t(self, name: str) -> torch.Tensor:
        return self.read(self.base, "base", name)

    def expert_t(self, i: int, name: str) -> torch.Tensor:
        task = self.tasks[i]
        return self.read(self.experts[task], f"expert '{task}'", name)

    def numel(self, name: str) -> int:
        return math.prod(self.base.shape(name))

    def inputs(
        self, name: str, base: torch.Tensor | None = None, held: list[torch.Tensor] | None = None
    ) -> TensorInputs:
        """Tensor ``name``: experts from ``held`` when read ahead, else read on each call."""
        if held is not None:
            expert = held.__getitem__
        else:

            def expert(i: int) -> torch.Tensor:
                return self.expert_t(i, name)

        b = self.base_t(name) if base is None else base
        return TensorInputs(name=name, base=b, tasks=self.tasks, expert=expert)


def merge_checkpoints(
    method: str,
    base: str,
    experts: Mapping[str, str],
    out: str | Path,
    params: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping | None = None,
    workers: int = 2,
    cache_bytes: int = 256 * 1024**2,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = False,
    force: bool = False,
) -> MergeReport:
    """Merge safetensors checkpoints tensor by tensor into ``out`` (atomically).

    ``θ = θ_0 + λ·τ_merged`` per tensor, computed in float32 and written in the base dtype, with
    bitwise the same result as :func:`mergeflow.methods.merge` on the whole state dicts: both run
    the method's registered prepare step and per-tensor kernel (:mod:`mergeflow.methods.registry`)
    and the same ``θ_0 + λ·τ`` step; the engine has no formula of its own. Inputs are read lazily
    through :class:`~mergeflow.io.SafetensorsFile` (local or fsspec URLs, sharded or not); a
    method with whole-model statistics (TIES ``scope=global``, PCB ``scope=global``) streams over
    the inputs in its prepare step to compute them exactly. Integer/bool tensors are copied from the
    base and listed; config/tokenizer files are copied so ``AutoModel.from_pretrained(out)``
    works. Nothing is written to ``out`` unless the whole merge succeeds, and an existing
    non-empty ``out`` (a directory with files, a file) is replaced only with ``force``. An
    object-store ``out`` (``s3://bucket/prefix``) is built locally, uploaded under a temporary
    prefix and published with the index last (see :func:`~mergeflow.engine.writer.remote_output_dir`).

    Args:
        method: Registered method name (see :func:`mergeflow.methods.available`).
        base: Base checkpoint (file, directory or URL).
        experts: Task name -> checkpoint.
        out: Output directory, local or an fsspec URL (replaced atomically).
        params: Method hyper-parameters.
        storage_options: fsspec options for every input.
        workers: Reader threads for read-ahead (0 = read in the compute thread).
        cache_bytes: A tensor's expert copies are held in memory (and read ahead) when together
            at most this large; larger ones are read once per pass instead.
        max_shard_bytes: Output shard size.
        progress: Show a rich progress bar (tensors/s, GB/s).
        force: Replace an existing non-empty ``out``.

    Returns:
        :class:`MergeReport`.

    Raises:
        MergeError: Unknown method / hyper-parameter, no experts, a task name with path parts,
            an ``out`` that is (or contains, or lies inside) an input, an existing non-empty
            ``out`` without ``force``, NaN/Inf (naming the tensor and file), or a merged value
            overflowing the base dtype.
        CheckpointError: Missing/pickled/truncated files, not regular files (FIFOs, devices,
            directories), different architectures, a tensor missing in an expert or with another
            shape (naming tensor and file).
        RemoteError: An object store without credentials, unreachable, or refusing a request,
            or a ``storage_options`` key it does not accept.

    """
    t0 = time.perf_counter()
    spec, pobj = resolve(method, params or {})
    if not experts:
        raise MergeError("no experts given: merging needs at least one fine-tuned expert")
    for task in experts:
        _check_task_name(task)
    inputs = [("the base", base), *((f"expert '{t}'", p) for t, p in experts.items())]
    check_out(out, inputs, force=force)  # local outputs
    opts = dict(storage_options or {})
    remote = _remote_out(out, opts)
    if remote is not None:
        _check_remote_out_apart(str(out), inputs)
        with object_store_errors(str(out), opts):
            existing = remote_files(*remote)
        if existing and not force:
            raise MergeError(remote_exists_message(str(out), existing))
    base_ck = Checkpoint(base, storage_options)
    ex_ck = {t: Checkpoint(p, storage_options) for t, p in experts.items()}
    check_same_architecture(base_ck, ex_ck)
    side_files = base_ck.side_files()  # FIFOs/devices among them are refused before merging
    reader = _Reader(base_ck, ex_ck)
    T = len(ex_ck)
    names = base_ck.keys()
    ctx = prepare(spec, pobj, reader)  # whole-model statistics: streaming passes, if any
    scaling = scaling_of(pobj)
    report = MergeReport(out=str(out), method=spec.name, params=pobj.model_dump())
    report.passes = 1 + reader.passes

    def load(name: str) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        b = reader.base_t(name)
        if not is_mergeable(name, b):
            return b, None
        if T * base_ck.nbytes(name) > cache_bytes:
            return b, None
        return b, [reader.expert_t(i, name) for i in range(T)]

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    window: deque[tuple[str, Future]] = deque()
    pending = iter(names)
    lookahead: list[str] = []

    def cost(name: str) -> int:
        nb = base_ck.nbytes(name)
        return nb if T * nb > cache_bytes else (T + 1) * nb

    def fill() -> None:
        # read ahead while the bytes held by queued reads stay within cache_bytes
        held = sum(cost(n) for n, _ in window)
        while pool is not None:
            name = next(pending, None) if not lookahead else lookahead.pop()
            if name is None:
                return
            if window and held + cost(name) > cache_bytes:
                lookahead.append(name)
                return
            window.append((name, pool.submit(load, name)))
            held += cost(name)

    bar = _Progress(len(names), reader, enabled=progress)
    try:
        with _output_dir(out, remote, opts, force) as tmp:
            plan = [(k, tuple(base_ck.shape(k)), base_ck.dtype(k)) for k in names]
            writer = ShardedWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
            try:
                for name in names:
                    if pool is not None:
                        fill()
                        qname, fut = window.popleft()
                        assert qname == name
                        b, es = fut.result()
                    else:
                        b, es = load(name)
                    if not is_mergeable(name, b):
                        writer.write(name, b)
                        report.copied.append(name)
                    else:
                        # the method's kernel, then θ_0 + λ·τ in place on its fresh float32
                        # buffer: the same two steps as mergeflow.methods.merge
                        tau = tensor_delta(spec, pobj, ctx, reader.inputs(name, b, es))
                        writer.write(name, assemble_tensor(name, b, tau, scaling))
                        del tau
                        report.merged.append(name)
                    bar.advance()
                writer.close()
            except BaseException:
                writer.abort()
                raise
            for side in side_files:
                (tmp / side).write_bytes(base_ck.read_side_file(side))
                report.side_files.append(side)
            report.bytes_read = reader.bytes
            report.seconds = time.perf_counter() - t0
            meta = {
                "method": report.method,
                "params": report.params,
                "paper": spec.paper,
                "base": str(base),
                "experts": dict(experts),
                "copied_from_base": report.copied,
                "n_merged": len(report.merged),
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    finally:
        bar.stop()
        if pool is not None:
            for _, f in window:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
    return report


def _check_task_name(task: str) -> None:
    """Task names end up in file names downstream: no path parts, no control characters."""
    bad = (
        not task
        or task in (".", "..")
        or any(c in task for c in "/\\")
        or task.startswith("..")
        or not task.isprintable()
    )
    if bad:
        raise MergeError(
            f"task name {task!r} is not allowed: use a name without '/', '\\' or a leading '..'"
        )


def _check_remote_out_apart(out: str, inputs: list[tuple[str, str]]) -> None:
    """Refuse an object-store ``out`` that is an input URL, holds one or lies inside one."""
    o = out.rstrip("/")
    for label, p in inputs:
        q = str(p).rstrip("/")
        if "://" not in q:
            continue
        if o == q or q.startswith(o + "/"):
            raise MergeError(
                f"--out {out} would replace {label} ({p}): choose an output location outside "
                "the inputs"
            )
        if o.startswith(q + "/"):
            raise MergeError(
                f"--out {out} is inside {label} ({p}): choose an output location outside the inputs"
            )


def _remote_out(out: str | Path, storage_options: Mapping) -> tuple[Any, str] | None:
    """``(filesystem, root)`` for an object-store ``out`` URL; None for a local path."""
    if "://" not in str(out):
        return None
    with object_store_errors(str(out), storage_options):
        fs, root = fsspec.core.url_to_fs(str(out), **storage_options)
    if isinstance(fs, LocalFileSystem):
        raise MergeError(f"--out {out}: give local outputs as a plain path, e.g. --out {root}")
    if "/" not in root.strip("/"):
        raise MergeError(
            f"--out {out}: name a prefix inside the bucket, e.g. {str(out).rstrip('/')}/merged"
        )
    return fs, root.rstrip("/")


@contextlib.contextmanager
def _output_dir(
    out: str | Path, remote: tuple[Any, str] | None, storage_options: Mapping, force: bool
) -> Iterator[Path]:
    """A temp directory to fill; on success it becomes ``out`` (local swap or remote publish)."""
    if remote is None:
        with atomic_dir(out, replace=force) as tmp:  # re-checked at the swap: one winner
            yield tmp
        return
    fs, root = remote
    last = (SINGLE_NAME, INDEX_NAME, META_NAME)  # the checkpoint appears whole, manifest last
    with (
        object_store_errors(str(out), storage_options),
        remote_output_dir(fs, root, str(out), force=force, last=last) as tmp,
    ):
        yield tmp


class _Progress:
    """Rich progress bar with tensors/s and GB/s, or nothing."""

    def __init__(self, total: int, reader: _Reader, enabled: bool):
        self.reader = reader
        self.t0 = time.perf_counter()
        self.p = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.p = Progress(
            TextColumn("merging"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            transient=False,
        )
        self.task = self.p.add_task("merge", total=total, rate="")
        self.p.start()

    def advance(self) -> None:
        if self.p is None:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        done = self.p.tasks[0].completed + 1
        rate = f"{done / dt:6.1f} tensors/s  {self.reader.bytes / dt / 1e9:5.2f} GB/s"
        self.p.update(self.task, advance=1, rate=rate)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()
