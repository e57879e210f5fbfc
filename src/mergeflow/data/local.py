"""Bring your own data: load a local CSV / JSON(L) / Parquet file or a ``datasets`` directory.

:func:`load_local` reads texts (or sentence pairs) and labels; :func:`local_task` describes a
``local_tasks:`` entry of ``params.yaml`` as a :class:`TaskSpec` (what the prepare stage reads);
:func:`register_local_task` adds one to the catalogue of a Python session.
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
from mergeflow.data.text import Text

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
    raw: Sequence[Any], where: str, label_field: str, label_names: Sequence[str] | None
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
        names = tuple(str(n) for n in label_names) if label_names is not None else None
        for row, y in enumerate(labels, start=1):
            if y < 0 or (names is not None and y >= len(names)):
                allowed = f"0..{len(names) - 1} (label_names)" if names else ">= 0"
                raise DataError(f"{where}: row {row}: {label_field!r} is {y}, expected {allowed}")
        return labels, names or tuple(str(i) for i in range(max(labels) + 1))
    for row, v in enumerate(raw, start=1):
        if not isinstance(v, str | bool):
            raise DataError(
                f"{where}: row {row}: {label_field!r} is {v!r} among string labels; "
                "use all ints or all strings"
            )
    strs = [str(v).strip() for v in raw]
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
        for row, v in enumerate(strs, start=1):
            if v not in names:
                raise DataError(
                    f"{where}: row {row}: {label_field!r} is {v!r}, not one of "
                    f"label_names {list(names)}"
                )
    else:
        names = tuple(sorted(set(strs)))
    index = {n: i for i, n in enumerate(names)}
    return [index[s] for s in strs], names


def load_local(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    text_pair_field: str | None = None,
    clean: bool = True,
    where: str | None = None,
) -> tuple[list[Text], list[int], tuple[str, ...]]:
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
        text_pair_field: Column holding the second text of a sentence-pair task (NLI premise
            + hypothesis, claim + evidence); texts are then ``(text, text_pair)`` tuples.
        clean: Strip texts, drop empty ones and de-duplicate (as :func:`load_task` does).
        where: What to name first in error messages (e.g. ``"local_tasks.my_nli"``); rows are
            counted from 1 over the data rows (a CSV header is not a row).

    Returns:
        ``(texts, labels, label_names)``.

    Raises:
        DataError: On a missing path, unsupported format, missing column, bad value (naming its
            row and column), or labels not covered by ``label_names``.

    """
    path = Path(path).expanduser()
    prefix = where
    where = f"{prefix}: {path}" if prefix else str(path)
    if not path.exists():
        raise DataError(f"{where} does not exist")
    try:
        rows, features = _read_rows(path)
    except DataError as err:
        raise DataError(f"{prefix}: {err}" if prefix else str(err)) from None
    if not rows:
        raise DataError(f"{where}: no rows")
    fields = {"text": text_field, "label": label_field}
    if text_pair_field is not None:
        fields["text_pair"] = text_pair_field
    for key, column in fields.items():
        if column not in rows[0]:
            raise DataError(f"{where}: {key}: no column {column!r}; columns are {list(rows[0])}")
    texts: list[Text] = []
    raw_labels: list[Any] = []
    for row_no, row in enumerate(rows, start=1):
        values = [row.get(text_field)]
        if text_pair_field is not None:
            values.append(row.get(text_pair_field))
        for column, value in zip((text_field, text_pair_field), values, strict=False):
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: row {row_no}: {column!r} is {value!r}, expected a string"
                )
        label = row.get(label_field)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: row {row_no}: {label_field!r} is empty")
        texts.append(values[0] if text_pair_field is None else (values[0], values[1]))
        raw_labels.append(label)

    class_label = features.get(label_field)
    if label_names is None and class_label is not None and hasattr(class_label, "names"):
        label_names = list(class_label.names)
    labels, names = _map_labels(raw_labels, where, label_field, label_names)
    if len(names) < 2:
        raise DataError(f"{where}: need at least 2 classes in {label_field!r}, found {list(names)}")
    if clean:
        texts, labels = clean_examples(texts, labels, names, what=where)
    return texts, labels, names


def local_task(
    name: str,
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Iterable[str] | None = None,
    text_pair_field: str | None = None,
    licence: str = "user-provided data - check its licence before sharing",
    description: str = "",
    where: str | None = None,
) -> TaskSpec:
    """A :class:`TaskSpec` for a local file / ``save_to_disk`` directory (not registered).

    The file is read once now (to fix the label names, and to fail early with the row at fault)
    and again by the spec's loader.

    Args:
        name: Task name.
        path: File or directory accepted by :func:`load_local`.
        text_field: Column holding the text.
        label_field: Column holding the label.
        label_names: Optional explicit class names.
        text_pair_field: Column of the second text of a sentence-pair task.
        licence: Licence note recorded in split metadata.
        description: One-line description.
        where: Prefix of error messages (default ``task '<name>'``).

    Returns:
        The spec; its loader returns the file's ``(texts, labels)``.

    Raises:
        DataError: If the file cannot be loaded.

    """
    given = Path(path).expanduser()  # read relative to the working directory (DVC's: the repo)
    where = where or f"task {name!r}"
    fields = {"text_field": text_field, "label_field": label_field}
    fields["text_pair_field"] = text_pair_field
    fixed = tuple(label_names) if label_names is not None else None
    _, _, names = load_local(given, label_names=fixed, where=where, **fields)

    def loader(cache_dir: Path) -> tuple[list[Text], list[int]]:
        del cache_dir  # local data needs no cache
        texts, labels, _ = load_local(given, label_names=names, where=where, **fields)
        return texts, labels

    pair = f", pairs ({text_field!r}, {text_pair_field!r})" if text_pair_field else ""
    return TaskSpec(
        name=name,
        label_names=names,
        licence=licence,
        source=f"local:{given.as_posix()}",  # as written: the same in every clone
        description=description or f"local data from {given.name}{pair}",
        loader=loader,
    )


def register_local_task(
    name: str,
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Iterable[str] | None = None,
    text_pair_field: str | None = None,
    licence: str = "user-provided data - check its licence before sharing",
    description: str = "",
    default: bool = True,
    replace: bool = False,
) -> TaskSpec:
    """Register a local file as a task of this Python session (notebooks, benchmarks).

    The pipeline does not need this: a ``local_tasks:`` entry of ``params.yaml`` names the file
    (see ``docs/tasks.md``). Arguments as for :func:`local_task`.

    Args:
        name: Task name.
        path: File or directory accepted by :func:`load_local`.
        text_field: Column holding the text.
        label_field: Column holding the label.
        label_names: Optional explicit class names.
        text_pair_field: Column of the second text of a sentence-pair task.
        licence: Licence note recorded in split metadata.
        description: One-line description.
        default: List it in ``available_tasks()``.
        replace: Replace an existing task of the same name.

    Returns:
        The registered :class:`TaskSpec`.

    Raises:
        DataError: If the file cannot be loaded or the name is taken.

    """
    spec = local_task(
        name,
        path,
        text_field=text_field,
        label_field=label_field,
        label_names=label_names,
        text_pair_field=text_pair_field,
        licence=licence,
        description=description,
    )
    return register_task(spec, default=default, replace=replace)
