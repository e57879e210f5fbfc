"""The results writer: byte copies, expert stopping steps, stage times, no silent overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergeflow.results import FILES, ResultsError, write


def _workspace(root: Path) -> Path:
    (root / "metrics").mkdir(parents=True)
    (root / "reports").mkdir()
    (root / "metrics/eval.json").write_text('{"expert": {"mean_normalized": 1.0}}\n')
    (root / "reports/summary.md").write_text("# mergeflow evaluation\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"tasks": ["a", "b"], "seed": 0}))
    for t, best in (("a", 40), ("b", 100)):
        d = root / "models/experts" / t
        d.mkdir(parents=True)
        (d / "expert.json").write_text(json.dumps(
            {"val_accuracy": 0.8, "best_step": best, "steps_run": best + 60,
             "val_history": [[20, 0.7], [best, 0.8]]}))  # fmt: skip
    (root / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"evaluate": {"outs": [{"path": "reports/summary.md",
                                                              "md5": "abc"}]}}}))  # fmt: skip
    return root


def test_writes_every_file_and_copies_metrics_byte_for_byte(tmp_path):
    ws = _workspace(tmp_path / "ws")
    out = write(ws, tmp_path / "results/paper", {"finetune@a": 10.0, "evaluate": 2.5})
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert (out / "eval.json").read_bytes() == (ws / "metrics/eval.json").read_bytes()
    assert (out / "params.yaml").read_bytes() == (ws / "params.yaml").read_bytes()
    experts = json.loads((out / "experts.json").read_text())
    assert experts["a"]["best_step"] == 40 and experts["b"]["steps_run"] == 160
    assert json.loads((out / "timings.json").read_text())["total_s"] == 12.5
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["outs"]["reports/summary.md"] == {"md5": "abc", "stage": "evaluate"}


def test_refuses_to_overwrite_without_force_and_leaves_no_partial_dir(tmp_path):
    ws = _workspace(tmp_path / "ws")
    out = tmp_path / "results/paper"
    write(ws, out, {})
    (out / "eval.json").write_text("mine")
    with pytest.raises(ResultsError, match="--force"):
        write(ws, out, {})
    assert (out / "eval.json").read_text() == "mine"
    write(ws, out, {}, force=True)
    assert (out / "eval.json").read_bytes() == (ws / "metrics/eval.json").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["paper"]


def test_a_workspace_that_never_ran_is_named(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(ResultsError, match="run `dvc repro` there first"):
        write(ws, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
