"""A local sentence-pair task through the whole DVC pipeline, beside a catalogue task (issue 20).

The local file is the dependency of its own ``prepare_local`` item only: editing it reruns that task,
not the catalogue task (checked with ``dvc status`` and ``dvc repro`` on a copy of the workspace).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from mergeflow.data import read_split
from tests.conftest import copy_workspace, dvc, make_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
THINGS = ["box", "car", "door", "cup", "bike", "hat", "kite", "boat"]
LOCAL = {
    "path": "data/raw/colours.csv",
    "text": "premise",
    "text_pair": "hypothesis",
    "label": "label",
    "label_names": ["entailment", "contradiction"],
}


def _write_pairs(path: Path, n: int = 240, seed: int = 0) -> None:
    """Premise 'the <thing> is <colour>'; the hypothesis agrees (entailment) or not."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["premise", "hypothesis", "label"])
        for i in range(n):
            thing, colour = rng.choice(THINGS), rng.choice(COLOURS)
            same = i % 2 == 0
            other = colour if same else rng.choice([c for c in COLOURS if c != colour])
            w.writerow(
                [
                    f"the {thing} {i} is {colour}",
                    f"the {thing} is {other}",
                    "entailment" if same else "contradiction",
                ]
            )


@pytest.fixture(scope="module")
def pair_workspace(tmp_path_factory) -> Path:
    ws = make_workspace(
        tmp_path_factory.mktemp("pairws"),
        {"tasks": ["rotten_tomatoes"], "local_tasks": {"colours": LOCAL}},
    )
    _write_pairs(ws / LOCAL["path"])
    proc = dvc(ws, "repro")
    (ws / "repro.log").write_text(proc.stdout + proc.stderr)
    return ws


def test_the_local_pair_task_runs_through_every_stage(pair_workspace: Path):
    ws = pair_workspace
    meta = json.loads((ws / "data/tasks/colours/meta.json").read_text())
    assert meta["pair"] is True and meta["label_names"] == ["entailment", "contradiction"]
    assert meta["source"] == "local:data/raw/colours.csv"  # as written: the same in every clone
    texts, _ = read_split(ws / "data/tasks/colours", "test", verify_sha256=True)
    assert all(isinstance(t, tuple) and t[1].startswith("the ") for t in texts)
    assert (ws / "models/experts/colours/model.safetensors").is_file()
    ev = json.loads((ws / "metrics/eval.json").read_text())
    for row in ("expert", "base", "task_arithmetic", "ties", "twin_merging", "tall_masks"):
        assert set(ev[row]["accuracy"]) == {"rotten_tomatoes", "colours"}, row
    report = (ws / "reports/summary.md").read_text()
    assert (
        "| colours | entailment, contradiction | text + text_pair (encoded as a pair) |" in report
    )
    assert "| rotten_tomatoes | negative, positive | text |" in report
    assert dvc(ws, "status", "--json").stdout.strip() == "{}"  # a second repro would do nothing


def test_editing_the_local_file_reruns_that_task_only(tmp_path: Path):
    """Only the two prepare items are reproduced first (a minute, not the whole pipeline)."""
    ws = make_workspace(
        tmp_path / "ws", {"tasks": ["rotten_tomatoes"], "local_tasks": {"colours": LOCAL}}
    )
    _write_pairs(ws / LOCAL["path"])
    dvc(ws, "repro", "prepare@rotten_tomatoes", "prepare_local@colours")
    ws = copy_workspace(ws, tmp_path / "copy")
    rt = ws / "data/tasks/rotten_tomatoes/train.jsonl"
    before_rt, before_local = (
        rt.stat().st_mtime_ns,
        (ws / "data/tasks/colours/meta.json").read_text(),
    )
    _write_pairs(ws / LOCAL["path"], seed=1)  # the same task, other rows
    targets = ("prepare@rotten_tomatoes", "prepare_local@colours")
    status = json.loads(dvc(ws, "status", *targets, "--json").stdout)
    assert set(status) == {"prepare_local@colours"}, status  # the catalogue task is up to date
    out = dvc(ws, "repro", "--single-item", "prepare_local@colours", "prepare@rotten_tomatoes")
    assert "Running stage 'prepare_local@colours'" in out.stdout
    assert "Running stage 'prepare@rotten_tomatoes'" not in out.stdout
    assert rt.stat().st_mtime_ns == before_rt
    assert (ws / "data/tasks/colours/meta.json").read_text() != before_local
    status = json.loads(dvc(ws, "status", *targets, "--json").stdout)
    assert status == {}  # both up to date again: the catalogue task never reran
