"""A (possibly sharded) safetensors checkpoint, local or on any fsspec store, read lazily."""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping

import fsspec
import torch

from mergeflow.io import CheckpointError, SafetensorsFile, refuse_pickle
from mergeflow.io.safetensors_io import (
    PICKLE_SUFFIXES,
    read_regular_file,
    regular_file_size,
)
from mergeflow.remote import object_store_errors

INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r".+-\d+-of-\d+\.safetensors")
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
        with object_store_errors(self.path, self.storage_options):
            self._open()

    def _open(self) -> None:
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
                wm = self._weight_map()
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
                # a lone shard (model-00001-of-00003…) is part of a checkpoint whose index is
                # missing, e.g. still being uploaded: never take it for the whole model
                sts = sorted(
                    n for n in names if n.endswith(".safetensors") and not _SHARD.fullmatch(n)
                )
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

    def _read_json(self, name: str) -> object:
        """Parse a JSON side file of the checkpoint directory (a regular file, UTF-8)."""
        url = self._url(name)
        raw = read_regular_file(self.fs, posixpath.join(self.dir, name), url)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{url}: not UTF-8 ({err}); save it as UTF-8 JSON") from None
        except (json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{url}: not valid JSON") from None

    def _weight_map(self) -> dict[str, str]:
        """The index's ``weight_map``: tensor name -> shard file name in this directory."""
        url = self._url(INDEX_NAME)
        index = self._read_json(INDEX_NAME)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if wm is None:
            raise CheckpointError(f"{url}: not a valid safetensors index (no 'weight_map')")
        ok = isinstance(wm, dict) and all(
            isinstance(k, str)
            and isinstance(v, str)
            and v.endswith(".safetensors")
            and v == posixpath.basename(v)
            and v not in (".", "..")
            for k, v in wm.items()
        )
        if not ok:
            raise CheckpointError(
                f"{url}: 'weight_map' must map tensor names to shard file names in the same "
                'directory, e.g. {"layer.0.weight": "model-00001-of-00002.safetensors"}'
            )
        return wm

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
        if not self._proto:
            return self.files[self.weight_map[name]].get(name)
        with object_store_errors(self.weight_map[name], self.storage_options):
            return self.files[self.weight_map[name]].get(name)

    def config(self) -> dict | None:
        """Parsed ``config.json`` next to the weights, or ``None``."""
        if self.dir is None:
            return None
        p = posixpath.join(self.dir, "config.json")
        if not self.fs.exists(p):
            return None
        with object_store_errors(self.path, self.storage_options):
            cfg = self._read_json("config.json")
        if not isinstance(cfg, dict):
            raise CheckpointError(
                f"{self._url('config.json')}: not a JSON object (got a {type(cfg).__name__}); "
                "config.json must map keys such as model_type to values"
            )
        return cfg

    def side_files(self) -> list[str]:
        """Names of the non-weight files to carry over (config, tokenizer, …)."""
        if self.dir is None:
            return []
        with object_store_errors(self.path, self.storage_options):
            return self._side_files()

    def _side_files(self) -> list[str]:
        out = []
        for info in self.fs.ls(self.dir, detail=True):
            n = posixpath.basename(info["name"].rstrip("/"))
            if n == INDEX_NAME or n.endswith((".safetensors", *PICKLE_SUFFIXES)):
                continue
            if n.startswith(".") or info.get("type") == "directory":
                continue
            # a FIFO or device here would block or never end when copied: refuse it now
            regular_file_size(self.fs, info["name"], self._url(n))
            out.append(n)
        return sorted(out)

    def read_side_file(self, name: str) -> bytes:
        """Bytes of a side file (see :meth:`side_files`).

        Raises:
            CheckpointError: It is no longer a regular file.

        """
        with object_store_errors(self._url(name), self.storage_options):
            return read_regular_file(self.fs, posixpath.join(self.dir, name), self._url(name))


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
                    f"expert '{task}' ({ck.file_of(k)}): tensor '{k}' has dtype {ed}, base has {bd}"
                )
