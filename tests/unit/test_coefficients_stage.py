"""The coefficients stage with learned runs, end to end: the ci run's own learned runs.

The ci profile (configs/ci.yaml) runs params.yaml's learned runs at 2 steps each (AdaMerging
task- and layer-wise, aTLAS on val and k-shot, Concrete over TA) and DAM, so the session's one
``dvc repro`` (``ci_workspace``) is what is checked here: the artifacts, the evaluate rows that
rebuild them, and the MLflow lineage of the data they consumed.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml

from mergeflow import coefficients as lc
from mergeflow.io import load_state_dict
from mergeflow.pipeline.artifacts import load_task_vectors

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# the ci profile's learned runs (configs/ci.yaml), checked by name below
LEARNED = ("adamerging_task", "adamerging_layer", "atlas_val", "atlas_kshot", "concrete_ta", "dam")


@pytest.fixture(scope="module")
def learned_ws(ci_workspace: Path) -> Path:
    learned = yaml.safe_load((ci_workspace / "params.yaml").read_text())["coefficients"]["learned"]
    assert set(learned) == set(LEARNED), "configs/ci.yaml's learned runs changed: update LEARNED"
    return ci_workspace


def test_learned_runs_write_artifacts_and_evaluate_rebuilds_them(learned_ws: Path):
    ws = learned_ws
    tasks = yaml.safe_load((ws / "params.yaml").read_text())["tasks"]
    coef = json.loads((ws / "artifacts/coefficients/coefficients.json").read_text())
    assert set(coef) == {"task_arithmetic", "ties", "consensus", "prune_suspect", *LEARNED}
    for name in LEARNED:
        d = ws / "artifacts/coefficients"
        assert coef[name]["learned"] == f"{name}.safetensors"
        assert (d / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        meta = json.loads((d / f"{name}.json").read_text())
        assert len(meta["losses"]) == 2 and meta["tasks"] == tasks
        assert {u["task"] for u in meta["data"]} == set(tasks)
    meta = json.loads((ws / "artifacts/coefficients/atlas_kshot.json").read_text())
    assert {(u["split"], u["k"], u["labels_used"]) for u in meta["data"]} == {("val", 2, True)}
    meta = json.loads((ws / "artifacts/coefficients/atlas_val.json").read_text())
    assert {(u["split"], u["labels_used"]) for u in meta["data"]} == {("val", True)}
    meta = json.loads((ws / "artifacts/coefficients/adamerging_layer.json").read_text())
    assert {(u["split"], u["labels_used"]) for u in meta["data"]} == {("test", False)}
    ev = json.loads((ws / "metrics/eval.json").read_text())
    for name in LEARNED:
        assert set(ev[name]["accuracy"]) == set(tasks)
    # the evaluate stage's model is exactly θ(α) from the stored coefficients
    base = load_state_dict(ws / "models/base/model.safetensors")
    tvs = load_task_vectors(ws / "artifacts/task_vectors", tasks)
    scheme, _, _, alpha, mask = lc.load_learned(ws / "artifacts/coefficients/concrete_ta.safetensors")
    assert scheme.kind == "task" and mask and alpha.unique().numel() == 1
    merged = lc.rebuild(base, tvs, ws / "artifacts/coefficients/concrete_ta.safetensors")
    k = next(iter(mask))
    expected = base[k] + alpha[0, 0] * sum(mask[k].float() * tvs[t][k] for t in tasks)
    torch.testing.assert_close(merged[k], expected)


def test_learned_runs_log_the_data_they_consumed(learned_ws: Path):
    con = sqlite3.connect(learned_ws / "mlflow.db")
    contexts = [
        r[0] for r in con.execute("select value from input_tags where name = 'mlflow.data.context'")
    ]
    assert any(
        c.startswith("atlas_kshot (labels used): k-shot (stratified) of val") and "k=2 seed=0" in c
        for c in contexts
    )
    # AdaMerging and Concrete consumed the same unlabeled test rows: one input per task names
    # every run that did
    both = ("adamerging_layer (labels NOT used)", "concrete_ta (labels NOT used)", ": test n=")
    assert sum(all(x in c for x in both) for c in contexts) == 3, contexts
    (uri,) = con.execute(
        "select artifact_uri from runs where name = 'coefficients' order by start_time desc"
    ).fetchone()
    art = Path(uri.removeprefix("file://")) / "coefficients/atlas_kshot/atlas_kshot.safetensors"
    assert art.is_file(), "learned coefficients are logged as an MLflow artifact"
