"""Seeded, stratified train/val/test splits and their on-disk JSONL format.

On disk a task directory holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one
``{"text": str, "label": int}`` object per line, UTF-8, ``ensure_ascii=False``; a sentence-pair task
adds ``"text_pair": str``) and ``meta.json`` (task, label names, licence, source, ``pair``,
per-split counts, label counts and sha256 of each file). In memory a text is a
:data:`~mergeflow.data.text.Text`: a string, or a ``(text, text_pair)`` tuple.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergeflow.data.catalogue import TaskSpec
from mergeflow.data.errors import DataError
from mergeflow.data.text import Text, check_text, is_pair, text_fields

SPLITS: tuple[str, ...] = ("train", "val", "test")
META_FILE = "meta.json"
FORMAT = "mergeflow.splits/v1"


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise DataError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def make_splits(
    texts: Sequence[Text],
    labels: Sequence[int],
    *,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
) -> dict[str, list[dict[str, Any]]]:
    """Draw disjoint, stratified, seeded train/val/test splits.

    The same inputs and seed give the same splits on every machine and Python version (only
    ``random.Random(seed).random()`` and stable sorts are used). Each split keeps the class
    proportions of the corpus up to rounding, and one example of every class is reserved for
    train first, so every label that occurs in the corpus appears in train. If the corpus is
    smaller than ``n_train + n_val + n_test``, train is shrunk first.

    Args:
        texts: Example texts: strings, or ``(text, text_pair)`` tuples (one kind per corpus).
        labels: Integer labels, same length as ``texts``.
        seed: Random seed.
        n_train: Wanted train size (> 0).
        n_val: Validation size (> 0); always filled exactly.
        n_test: Test size (> 0); always filled exactly.

    Returns:
        ``{"train": [{"text", "label"}, ...], "val": [...], "test": [...]}``.

    Raises:
        DataError: On bad sizes or inputs, or when val/test (plus one train example per class)
            cannot be filled from the corpus.

    """
    n_train = _check_size("n_train", n_train)
    n_val = _check_size("n_val", n_val)
    n_test = _check_size("n_test", n_test)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DataError(f"seed must be an int, got {seed!r}")
    texts = list(texts)
    labels = list(labels)
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise DataError("cannot split an empty corpus")
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        check_text(text, f"text #{i}", pair=is_pair(texts[0]))
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
            raise DataError(f"label #{i} is {label!r}, expected a non-negative int")

    by_class: dict[int, list[int]] = {}
    for idx, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(idx)
    classes = sorted(by_class)
    n_total = len(texts)
    available_train = n_total - n_val - n_test
    if available_train < len(classes):
        raise DataError(
            f"corpus has {n_total} examples in {len(classes)} classes: cannot fill "
            f"n_val={n_val} + n_test={n_test} and keep one train example per class; "
            f"lower n_val/n_test"
        )
    if n_train < len(classes):
        raise DataError(
            f"n_train={n_train} is smaller than the number of classes ({len(classes)}); "
            "every class must appear in train"
        )
    n_train = min(n_train, available_train)

    rng = random.Random(int(seed))
    # Shuffle each class with random keys (stable across platforms), reserve its first element
    # for train, then interleave the rest proportionally: the k-th of n remaining members of a
    # class gets key (k + u) / n, u ~ U[0, 1). Every prefix of that order is near-stratified.
    reserved: list[int] = []
    keyed: list[tuple[float, int]] = []
    for cls in classes:
        members = sorted(by_class[cls], key=lambda i: (rng.random(), i))
        reserved.append(members[0])
        rest = members[1:]
        keyed.extend(((k + rng.random()) / len(rest), i) for k, i in enumerate(rest))
    order = [i for _, i in sorted(keyed)]

    val_idx = order[:n_val]
    test_idx = order[n_val : n_val + n_test]
    train_idx = reserved + order[n_val + n_test : n_val + n_test + n_train - len(reserved)]

    def rows(indices: list[int]) -> list[dict[str, Any]]:
        shuffled = sorted(indices, key=lambda i: (rng.random(), i))
        return [{"text": texts[i], "label": int(labels[i])} for i in shuffled]

    return {"train": rows(train_idx), "val": rows(val_idx), "test": rows(test_idx)}


def _jsonl_bytes(rows: Sequence[Mapping[str, Any]], split: str, n_labels: int, pair: bool) -> bytes:
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "text" not in row or "label" not in row:
            raise DataError(f"splits[{split!r}][{i}] must be a dict with 'text' and 'label'")
        text, label = row["text"], row["label"]
        check_text(text, f"splits[{split!r}][{i}]['text']", pair=pair)
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise DataError(f"splits[{split!r}][{i}]['label'] is {label!r}, not an int")
        if not 0 <= label < n_labels:
            raise DataError(
                f"splits[{split!r}][{i}]['label'] = {label} is outside 0..{n_labels - 1}"
            )
        obj = text_fields(text) | {"label": int(label)}
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


def write_splits(
    out_dir: str | os.PathLike[str],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    spec: TaskSpec | None,
    extra_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``train/val/test.jsonl`` and ``meta.json`` to ``out_dir`` atomically.

    Everything is written into a temporary directory next to ``out_dir`` which then replaces
    ``out_dir`` (an existing ``out_dir`` is replaced as a whole).

    Args:
        out_dir: Destination directory.
        splits: Output of :func:`make_splits` (keys ``train``, ``val``, ``test``).
        spec: Task spec for task name, label names, licence and source; ``None`` for ad-hoc
            data (then ``extra_meta`` may give ``task``/``label_names``/``licence``/``source``,
            otherwise label names are ``"0".."K-1"``).
        extra_meta: Extra JSON-serialisable keys merged into ``meta.json`` (e.g. seed, sizes).

    Returns:
        The meta dict written to ``meta.json``.

    Raises:
        DataError: On missing splits, bad rows, labels outside the label set, or
            non-serialisable ``extra_meta``.

    """
    out_dir = Path(out_dir)
    if not isinstance(splits, Mapping):
        raise DataError("splits must be a dict with keys 'train', 'val', 'test'")
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"splits is missing {missing}; expected keys {list(SPLITS)}")
    extra = dict(extra_meta or {})
    if spec is not None:
        task, label_names = spec.name, list(spec.label_names)
        licence, source = spec.licence, spec.source
    else:
        task = extra.get("task")
        licence, source = extra.get("licence", ""), extra.get("source", "")
        if extra.get("label_names") is not None:
            label_names = [str(x) for x in extra["label_names"]]
        else:
            max_label = max(
                (int(r["label"]) for s in SPLITS for r in splits[s] if _is_int(r.get("label"))),
                default=-1,
            )
            label_names = [str(i) for i in range(max(max_label + 1, 1))]
    n_labels = len(label_names)
    first = next((r for s in SPLITS for r in splits[s] if isinstance(r, Mapping)), None)
    pair = first is not None and is_pair(first.get("text"))

    payloads = {s: _jsonl_bytes(splits[s], s, n_labels, pair) for s in SPLITS}
    label_counts = {s: [0] * n_labels for s in SPLITS}
    for s in SPLITS:
        for row in splits[s]:
            label_counts[s][int(row["label"])] += 1
    meta: dict[str, Any] = {
        "format": FORMAT,
        "task": task,
        "label_names": label_names,
        "licence": licence,
        "source": source,
        "pair": pair,  # rows hold "text" and "text_pair" (a sentence-pair task)
        "counts": {s: len(splits[s]) for s in SPLITS},
        "label_counts": label_counts,
        "sha256": {s: hashlib.sha256(payloads[s]).hexdigest() for s in SPLITS},
    }
    meta.update(extra)
    try:
        meta_bytes = (json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise DataError(f"extra_meta is not JSON-serialisable: {exc}") from exc

    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        for s in SPLITS:
            _write_synced(tmp / f"{s}.jsonl", payloads[s])
        _write_synced(tmp / META_FILE, meta_bytes)
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "d")  # move aside; replaced below
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "d").exists() and not out_dir.exists():
            os.replace(old / "d", out_dir)  # roll back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:  # inside the private temp dir: no partial file is ever visible
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_meta(task_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``meta.json`` of a split directory.

    Args:
        task_dir: Directory written by :func:`write_splits`.

    Returns:
        The meta dict.

    Raises:
        DataError: If the file is missing or not a JSON object.

    """
    path = Path(task_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; was {task_dir} written by write_splits?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def read_split(
    task_dir: str | os.PathLike[str], split: str, *, verify_sha256: bool = False
) -> tuple[list[Text], list[int]]:
    """Read one split written by :func:`write_splits`.

    Labels are checked against ``label_names`` from ``meta.json`` when that file exists.

    Args:
        task_dir: Directory holding ``<split>.jsonl`` (and ``meta.json``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        verify_sha256: Also check the file against the sha256 recorded in ``meta.json``.

    Returns:
        ``(texts, labels)``; a text is a string, or a ``(text, text_pair)`` tuple for a
        sentence-pair task (rows with ``"text_pair"``).

    Raises:
        DataError: On an unknown split, a missing file, a bad JSON line (file and line number
            are named), a missing/mistyped field, a label outside the label set, an empty
            split, or a hash mismatch.

    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    task_dir = Path(task_dir)
    path = task_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found")
    meta = read_meta(task_dir) if (task_dir / META_FILE).exists() else None
    n_labels: int | None = None
    if meta is not None and isinstance(meta.get("label_names"), list):
        n_labels = len(meta["label_names"])
    raw = path.read_bytes()
    if verify_sha256:
        expected = (meta or {}).get("sha256", {}).get(split)
        actual = hashlib.sha256(raw).hexdigest()
        if expected != actual:
            raise DataError(f"{path}: sha256 {actual} does not match meta.json ({expected})")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc})") from exc
    texts: list[Text] = []
    labels: list[int] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028, U+0085, ... which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: 'text' missing or not a string")
        if "text_pair" in obj:
            if not isinstance(obj["text_pair"], str):
                raise DataError(f"{path}:{lineno}: 'text_pair' is not a string")
            text = (text, obj["text_pair"])
        if texts and is_pair(text) != is_pair(texts[0]):
            raise DataError(f"{path}:{lineno}: 'text_pair' on some rows only; a split is one kind")
        if not _is_int(label):
            raise DataError(f"{path}:{lineno}: 'label' missing or not an int (got {label!r})")
        if label < 0 or (n_labels is not None and label >= n_labels):
            allowed = f"0..{n_labels - 1}" if n_labels is not None else ">= 0"
            raise DataError(f"{path}:{lineno}: label {label} is outside the label set ({allowed})")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError(
            f"{path}: the split is empty; rerun the prepare stage (or raise data.n_{split})"
        )
    return texts, labels
