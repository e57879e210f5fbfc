"""Bring your own data: load a local CSV / JSON(L) / Parquet file or a ``datasets`` directory.

:func:`load_local` reads texts and labels; :func:`register_local_task` turns a file into a named
task usable everywhere a built-in task name is accepted.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mergeflow.data.catalogue import TaskSpec, clean_examples, register_task
from mergeflow.data.errors import DataError

_INT_RE = re.compile(r"^\s*\d+\s*$")


def _rows_from_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return list(csv.DictReader(fh, delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot parse as UTF-8 CSV: {exc}") from exc


def _rows_from_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(obj)
    return rows


def _rows_from_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _rows_from_jsonl(path, text)  # e.g. Dataset.to_json() writes JSON lines
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: columns have different lengths {sorted(lengths)}")
        keys = list(data)
        return [dict(zip(keys, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects, a dict of columns, or JSON lines")
    return data


def _rows_from_datasets(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        import datasets  # lazy: heavy import
    except ImportError as exc:  # pragma: no cover - datasets is a project dependency
        raise DataError(f"{path} is a directory; reading it needs the 'datasets' package") from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: not a directory saved by datasets' save_to_disk "
            f"(or a .csv/.jsonl/.json/.parquet file): {exc}"
        ) from exc
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    rows: list[dict[str, Any]] = []
    features: dict[str, Any] = {}
    for part in parts:  # a DatasetDict is concatenated in split order (we re-split anyway)
        features.update(part.features)
        rows.extend(part.to_list())
    return rows, features


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if path.is_dir():
        return _rows_from_datasets(path)
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv"}:
        return _rows_from_csv(path, "\t" if suffix == ".tsv" else ","), {}
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy; pyarrow comes with datasets

        try:
            return pq.read_table(path).to_pylist(), {}
        except Exception as exc:  # pyarrow raises several unrelated types
            raise DataError(f"{path}: cannot read Parquet: {exc}") from exc
    if suffix in {".jsonl", ".json", ".ndjson"}:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8: {exc}") from exc
        if suffix == ".json":
            return _rows_from_json(path, text), {}
        return _rows_from_jsonl(path, text), {}
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .json, .parquet "
        "or a datasets.save_to_disk directory"
    )


def _map_labels(
    raw: Sequence[Any], path: Path, label_field: str, label_names: Sequence[str] | None
) -> tuple[list[int], tuple[str, ...]]:
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, numbers.Integral):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and _INT_RE.match(v):
            return int(v)
        return None

    ints = [as_int(v) for v in raw]
    if all(i is not None for i in ints):
        labels = [int(i) for i in ints if i is not None]
        if any(i < 0 for i in labels):
            raise DataError(f"{path}: negative integer label in {label_field!r}")
        if label_names is not None:
            names = tuple(str(n) for n in label_names)
            if max(labels) >= len(names):
                raise DataError(
                    f"{path}: label {max(labels)} in {label_field!r} has no name in "
                    f"label_names={list(names)}"
                )
        else:
            names = tuple(str(i) for i in range(max(labels) + 1))
        return labels, names
    bad = [v for v in raw if not isinstance(v, str | bool)]
    if bad:
        raise DataError(
            f"{path}: {label_field!r} mixes numbers and strings or has unsupported values "
            f"(e.g. {bad[0]!r}); use all ints or all strings"
        )
    strs = [str(v).strip() for v in raw]
    present = sorted(set(strs))
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
        unknown = [s for s in present if s not in names]
        if unknown:
            raise DataError(f"{path}: labels {unknown} are not in label_names={list(names)}")
    else:
        names = tuple(present)
    index = {n: i for i, n in enumerate(names)}
    return [index[s] for s in strs], names


def load_local(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    clean: bool = True,
) -> tuple[list[str], list[int], tuple[str, ...]]:
    """Load a local labelled text file or a ``datasets.Dataset.save_to_disk`` directory.

    Supported: ``.csv``/``.tsv`` (header row), ``.jsonl``/``.ndjson``, ``.json`` (list of
    objects, dict of columns, or JSON lines), ``.parquet``, and ``save_to_disk`` directories
    (a ``DatasetDict`` is concatenated over its splits). String labels are mapped to ints in
    sorted order; integer labels (also digit strings, as in CSV) are kept and named
    ``"0".."K-1"``; a ``ClassLabel`` column keeps its names.

    Args:
        path: File or directory.
        text_field: Column holding the text.
        label_field: Column holding the label.
        label_names: Optional explicit class names (string labels are mapped in this order,
            integer labels index into it).
        clean: Strip texts, drop empty ones and de-duplicate (as :func:`load_task` does).

    Returns:
        ``(texts, labels, label_names)``.

    Raises:
        DataError: On a missing path, unsupported format, missing column, bad value, or
            labels not covered by ``label_names``.

    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    rows, features = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    for field_name in (text_field, label_field):
        if field_name not in rows[0]:
            raise DataError(
                f"{path}: no column {field_name!r}; columns are {list(rows[0])} "
                "(pass text_field=/label_field=)"
            )
    texts: list[Any] = []
    raw_labels: list[Any] = []
    for i, row in enumerate(rows):
        text, label = row.get(text_field), row.get(label_field)
        if not isinstance(text, str):
            raise DataError(f"{path}: row {i}: {text_field!r} is {text!r}, expected a string")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}: row {i}: {label_field!r} is empty")
        texts.append(text)
        raw_labels.append(label)

    class_label = features.get(label_field)
    if label_names is None and class_label is not None and hasattr(class_label, "names"):
        label_names = list(class_label.names)
    labels, names = _map_labels(raw_labels, path, label_field, label_names)
    if len(names) < 2:
        raise DataError(f"{path}: need at least 2 classes in {label_field!r}, found {list(names)}")
    if clean:
        texts, labels = clean_examples(texts, labels, names, what=str(path))
    return texts, labels, names


def register_local_task(
    name: str,
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Iterable[str] | None = None,
    licence: str = "user-provided data - check its licence before sharing",
    description: str = "",
    default: bool = True,
    replace: bool = False,
) -> TaskSpec:
    """Register a local file / ``save_to_disk`` directory as a task named ``name``.

    The file is read once now (to fix the label names) and again on every :func:`load_task`.

    Args:
        name: Task name.
        path: File or directory accepted by :func:`load_local`.
        text_field: Column holding the text.
        label_field: Column holding the label.
        label_names: Optional explicit class names.
        licence: Licence note recorded in split metadata.
        description: One-line description.
        default: List it in ``available_tasks()``.
        replace: Replace an existing task of the same name.

    Returns:
        The registered :class:`TaskSpec`.

    Raises:
        DataError: If the file cannot be loaded or the name is taken.

    """
    resolved = Path(path).expanduser().resolve()
    fixed_names = tuple(label_names) if label_names is not None else None
    _, _, names = load_local(
        resolved, text_field=text_field, label_field=label_field, label_names=fixed_names
    )

    def loader(cache_dir: Path) -> tuple[list[str], list[int]]:
        del cache_dir  # local data needs no cache
        texts, labels, now = load_local(
            resolved, text_field=text_field, label_field=label_field, label_names=names
        )
        if now != names:  # pragma: no cover - load_local with fixed names keeps them
            raise DataError(f"{resolved}: label set changed since task {name!r} was registered")
        return texts, labels

    spec = TaskSpec(
        name=name,
        label_names=names,
        licence=licence,
        source=f"local:{resolved}",
        description=description or f"local data from {resolved.name}",
        loader=loader,
    )
    return register_task(spec, default=default, replace=replace)
