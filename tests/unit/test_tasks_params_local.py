"""Local task files in every accepted format, with sentence pairs, through splits on disk (issue 20)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mergeflow.data import (
    DataError,
    load_local,
    local_task,
    make_splits,
    read_meta,
    read_split,
    write_splits,
)

ROWS = [
    {"premise": f"premise {i}", "hypothesis": f"hypothesis {i % 7}", "label": ["no", "yes"][i % 2]}
    for i in range(40)
]
PAIRS = [(r["premise"], r["hypothesis"]) for r in ROWS]
LABELS = [["no", "yes"].index(r["label"]) for r in ROWS]


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if path.suffix == "" or path.name.endswith("_ds"):
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(
                fh, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ","
            )
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "name", ["nli.csv", "nli.tsv", "nli.jsonl", "nli.json", "nli.parquet", "nli_ds"]
)
def test_every_format_loads_pairs_in_row_order(tmp_path: Path, name: str):
    path = _write(tmp_path / name, ROWS)
    texts, labels, names = load_local(
        path, text_field="premise", text_pair_field="hypothesis", label_field="label"
    )
    assert texts == PAIRS and labels == LABELS and names == ("no", "yes")
    single, _, _ = load_local(path, text_field="hypothesis", label_field="label")
    assert single == [f"hypothesis {i}" for i in range(7)]  # de-duplicated, first kept


def test_save_to_disk_class_label_names_are_kept(tmp_path: Path):
    import datasets

    feats = datasets.Features(
        {
            "a": datasets.Value("string"),
            "b": datasets.Value("string"),
            "y": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    rows = [{"a": f"a{i}", "b": f"b{i}", "y": i % 3} for i in range(9)]
    d = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:6], features=feats),
         "test": datasets.Dataset.from_list(rows[6:], features=feats)}
    )  # fmt: skip
    d.save_to_disk(str(tmp_path / "ds"))
    texts, labels, names = load_local(
        tmp_path / "ds", text_field="a", text_pair_field="b", label_field="y"
    )
    assert names == ("entailment", "neutral", "contradiction")
    assert texts[7] == ("a7", "b7") and labels[7] == 1


def test_pairs_are_cleaned_as_pairs(tmp_path: Path):
    rows = [
        {"p": " same ", "h": "one", "label": "x"},
        {"p": "same", "h": "two", "label": "y"},  # same premise, other hypothesis: kept
        {"p": "same", "h": " one", "label": "y"},  # the same pair after stripping: dropped
        {"p": "empty second", "h": "  ", "label": "y"},  # an empty side: dropped
    ]
    texts, labels, _ = load_local(
        _write(tmp_path / "p.jsonl", rows), text_field="p", text_pair_field="h"
    )
    assert texts == [("same", "one"), ("same", "two")] and labels == [0, 1]


def test_a_bad_value_names_its_row_and_column(tmp_path: Path):
    rows = [dict(r) for r in ROWS[:5]]
    rows[3]["hypothesis"] = None
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_local(path, text_field="premise", text_pair_field="hypothesis", where="local_tasks.n")
    assert (
        str(err.value) == f"local_tasks.n: {path}: row 4: 'hypothesis' is None, expected a string"
    )


def test_splits_on_disk_keep_the_pair_and_read_back_as_tuples(tmp_path: Path):
    spec = local_task(
        "nli",
        _write(tmp_path / "nli.csv", ROWS),
        text_field="premise",
        text_pair_field="hypothesis",
    )
    texts, labels = spec.loader(tmp_path)
    splits = make_splits(texts, labels, seed=0, n_train=20, n_val=8, n_test=8)
    meta = write_splits(tmp_path / "out", splits, spec=spec)
    assert meta["pair"] is True and read_meta(tmp_path / "out")["pair"] is True
    first = json.loads((tmp_path / "out" / "train.jsonl").read_text().split("\n")[0])
    assert set(first) == {"text", "text_pair", "label"}
    back, _ = read_split(tmp_path / "out", "test", verify_sha256=True)
    assert back == [r["text"] for r in splits["test"]] and all(isinstance(t, tuple) for t in back)
    assert spec.source == f"local:{tmp_path / 'nli.csv'}"


def test_a_split_mixing_texts_and_pairs_is_refused(tmp_path: Path):
    with pytest.raises(DataError, match="text #1"):
        make_splits([("a", "b"), "c", ("d", "e")], [0, 1, 0], seed=0, n_train=1, n_val=1, n_test=1)
    d = tmp_path / "t"
    d.mkdir()
    (d / "val.jsonl").write_text(
        '{"text": "a", "text_pair": "b", "label": 0}\n{"text": "c", "label": 1}\n'
    )
    with pytest.raises(DataError, match=r"val\.jsonl:2: 'text_pair' on some rows only"):
        read_split(d, "val")


def test_vitaminc_pair_keeps_claim_and_evidence_apart_and_vitaminc_is_unchanged():
    from mergeflow.data import load_task

    pairs, labels, names = load_task("vitaminc_pair")
    texts, labels2, _ = load_task("vitaminc")
    assert names == ("supports", "refutes", "not_enough_info")
    assert all(isinstance(p, tuple) and p[0] and p[1] for p in pairs[:100])
    # the single-text task is the concatenation it always was (results/paper depends on it)
    assert texts[0] == f"claim: {pairs[0][0]} evidence: {pairs[0][1]}" and labels2[0] == labels[0]
