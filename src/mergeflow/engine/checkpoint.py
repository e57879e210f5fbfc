"""A (possibly sharded) safetensors checkpoint, local or on any fsspec store, read lazily."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping

import fsspec
import torch

from mergeflow.io import CheckpointError, SafetensorsFile, refuse_pickle
from mergeflow.io.safetensors_io import PICKLE_SUFFIXES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# config.json fields that must agree between base and experts (when both define them).
ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)

_HOW_TO_CONVERT = (
    "pickled checkpoints are refused (unpickling runs arbitrary code); convert once, in a "
    "trusted environment: `AutoModel.from_pretrained(dir).save_pretrained(dir, "
    "safe_serialization=True)` or `safetensors.torch.save_file(torch.load(p, "
    "weights_only=True), 'model.safetensors')`"
)


class Checkpoint:
    """Name -> tensor view over a safetensors checkpoint, one tensor read at a time.

    ``path`` is a ``.safetensors`` file or a directory holding ``model.safetensors`` or a
    sharded ``model.safetensors.index.json`` (Hugging Face layout); local or fsspec URL
    (``s3://…``). Only headers are read on construction.

    Args:
        path: File or directory, local path or URL.
        storage_options: fsspec options (e.g. ``{"client_kwargs": {"endpoint_url": …}}``).

    Raises:
        CheckpointError: Not found, pickled (``.bin``/``.pt``…; says how to convert), a
            corrupt/truncated shard, or an index naming a missing shard.

    """

    def __init__(self, path: str, storage_options: Mapping | None = None):
        self.path = str(path).rstrip("/")
        self.storage_options = dict(storage_options or {})
        refuse_pickle(self.path)
        self.fs, root = fsspec.core.url_to_fs(self.path, **self.storage_options)
        self._proto = self.path.split("://", 1)[0] + "://" if "://" in self.path else ""
        self.files: dict[str, SafetensorsFile] = {}
        self.weight_map: dict[str, str] = {}
        if self.path.endswith(".safetensors"):
            self.dir = None
            self._add(self.path)
        else:
            if not self.fs.isdir(root):
                if self.fs.exists(root):
                    raise CheckpointError(f"{self.path}: not a .safetensors file or a directory")
                raise CheckpointError(f"{self.path}: not found")
            self.dir = root
            names = {posixpath.basename(p) for p in self.fs.ls(root, detail=False)}
            if INDEX_NAME in names:
                with self.fs.open(posixpath.join(root, INDEX_NAME), "r") as f:
                    try:
                        wm = json.load(f)["weight_map"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CheckpointError(
                            f"{self._url(INDEX_NAME)}: not a valid safetensors index"
                        ) from None
                for shard in dict.fromkeys(wm.values()):
                    if shard not in names:
                        raise CheckpointError(
                            f"{self._url(INDEX_NAME)} names shard '{shard}', which is missing"
                        )
                    self._add(self._url(shard))
                for name, shard in wm.items():
                    if name not in self.files[self._url(shard)]:
                        raise CheckpointError(
                            f"{self._url(shard)}: tensor '{name}' listed in the index is missing"
                        )
            elif SINGLE_NAME in names:
                self._add(self._url(SINGLE_NAME))
            else:
                sts = sorted(n for n in names if n.endswith(".safetensors"))
                pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
                if len(sts) == 1:
                    self._add(self._url(sts[0]))
                elif pickles and not sts:
                    raise CheckpointError(f"{self._url(pickles[0])}: {_HOW_TO_CONVERT}")
                else:
                    raise CheckpointError(
                        f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} found "
                        f"(files: {', '.join(sorted(names)) or 'none'})"
                    )

    def _url(self, name: str) -> str:
        return self._proto + posixpath.join(self.dir, name) if self.dir else name

    def _add(self, url: str) -> None:
        f = SafetensorsFile(url, self.storage_options)
        self.files[url] = f
        for name in f.keys():
            if name in self.weight_map:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' appears in both {self.weight_map[name]} and {url}"
                )
            self.weight_map[name] = url

    def keys(self) -> list[str]:
        """Tensor names in shard order, then file order."""
        return list(self.weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        """URL of the shard holding ``name``."""
        return self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` from the header."""
        return self.files[self.weight_map[name]].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of ``name`` from the header."""
        return self.files[self.weight_map[name]].dtype(name)

    def nbytes(self, name: str) -> int:
        """Bytes of ``name``'s data."""
        n = 1
        for s in self.shape(name):
            n *= s
        return n * torch.empty((), dtype=self.dtype(name)).element_size()

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor.

        Raises:
            CheckpointError: Missing tensor or truncated file (naming the file).

        """
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        return self.files[self.weight_map[name]].get(name)

    def config(self) -> dict | None:
        """Parsed ``config.json`` next to the weights, or ``None``."""
        if self.dir is None:
            return None
        p = posixpath.join(self.dir, "config.json")
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError:
                raise CheckpointError(f"{self._url('config.json')}: not valid JSON") from None

    def side_files(self) -> list[str]:
        """Names of the non-weight files to carry over (config, tokenizer, …)."""
        if self.dir is None:
            return []
        out = []
        for p in self.fs.ls(self.dir, detail=False):
            n = posixpath.basename(p)
            if n == INDEX_NAME or n.endswith((".safetensors", *PICKLE_SUFFIXES)):
                continue
            if n.startswith(".") or self.fs.isdir(p):
                continue
            out.append(n)
        return sorted(out)

    def read_side_file(self, name: str) -> bytes:
        """Bytes of a side file (see :meth:`side_files`)."""
        with self.fs.open(posixpath.join(self.dir, name), "rb") as f:
            return f.read()


def check_same_architecture(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> None:
    """Compare ``config.json`` architecture fields and tensor names/shapes with the base.

    Raises:
        CheckpointError: A config field differs (naming both files), or an expert misses a
            tensor of the base, has an extra one, or a shape differs, or a dtype of another
            kind (float vs integer/bool; naming tensor and file).

    """
    bcfg = base.config() or {}
    for task, ck in experts.items():
        ecfg = ck.config() or {}
        for field in ARCH_FIELDS:
            if field in bcfg and field in ecfg and bcfg[field] != ecfg[field]:
                raise CheckpointError(
                    f"expert '{task}' ({ck.path}) is a different architecture: config.json "
                    f"{field}={ecfg[field]!r}, base ({base.path}) has {bcfg[field]!r}"
                )
        missing = [k for k in base.keys() if k not in ck]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"expert '{task}' ({ck.path}) is missing tensor '{missing[0]}'{more} of the base"
            )
        extra = [k for k in ck.keys() if k not in base]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"expert '{task}' ({ck.file_of(extra[0])}) has tensor '{extra[0]}'{more} "
                "that the base lacks"
            )
        for k in base.keys():
            if ck.shape(k) != base.shape(k):
                raise CheckpointError(
                    f"expert '{task}' ({ck.file_of(k)}): tensor '{k}' has shape "
                    f"{ck.shape(k)}, base has {base.shape(k)}"
                )
            # float experts of another precision are fine (merged in float32, written in the
            # base dtype); a float/integer/bool mismatch means another kind of tensor
            bd, ed = base.dtype(k), ck.dtype(k)
            if bd != ed and not (bd.is_floating_point and ed.is_floating_point):
                raise CheckpointError(
                    f"expert '{task}' ({ck.file_of(k)}): tensor '{k}' has dtype {ed}, "
                    f"base has {bd}"
                )
