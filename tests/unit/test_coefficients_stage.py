"""The coefficients stage with learned runs, end to end on a copy of the ci-size workspace.

The ci profile keeps ``coefficients.run_learned: false`` so the shared e2e contract stays as it is;
this test switches the learned runs on (a few steps each), reruns ``coefficients`` and
``evaluate`` through DVC, and checks the artifacts, the evaluate rows and the MLflow lineage.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml

from mergeflow import coefficients as lc
from mergeflow.io import load_state_dict
from mergeflow.pipeline.artifacts import load_task_vectors
from tests.conftest import dvc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEARNED = {
    "ada_layer": {"method": "adamerging", "blocks": "layer", "steps": 2, "batch_size": 4},
    "atlas_k2": {
        "method": "atlas",
        "blocks": "atlas",
        "partitions": 2,
        "data": "kshot",
        "k": 2,
        "steps": 2,
        "eval_every": 1,
        "batch_size": 4,
    },
    "concrete": {"method": "concrete", "blocks": "task", "steps": 2, "batch_size": 4},
}


@pytest.fixture(scope="module")
def learned_ws(ci_workspace: Path, tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("learned") / "ws"
    shutil.copytree(ci_workspace, ws, symlinks=True)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["coefficients"].update({"run_learned": True, "learned": LEARNED})
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(ws, "repro")
    (ws / "repro_learned.log").write_text(proc.stdout + proc.stderr)
    return ws


def test_learned_runs_write_artifacts_and_evaluate_rebuilds_them(learned_ws: Path):
    ws = learned_ws
    tasks = yaml.safe_load((ws / "params.yaml").read_text())["tasks"]
    coef = json.loads((ws / "artifacts/coefficients/coefficients.json").read_text())
    assert set(coef) == {"task_arithmetic", "ties", "consensus", *LEARNED}
    for name in LEARNED:
        d = ws / "artifacts/coefficients"
        assert coef[name]["learned"] == f"{name}.safetensors"
        assert (d / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        meta = json.loads((d / f"{name}.json").read_text())
        assert len(meta["losses"]) == 2 and meta["tasks"] == tasks
        assert {u["task"] for u in meta["data"]} == set(tasks)
    meta = json.loads((ws / "artifacts/coefficients/atlas_k2.json").read_text())
    assert {(u["split"], u["k"], u["labels_used"]) for u in meta["data"]} == {("val", 2, True)}
    meta = json.loads((ws / "artifacts/coefficients/ada_layer.json").read_text())
    assert {(u["split"], u["labels_used"]) for u in meta["data"]} == {("test", False)}
    ev = json.loads((ws / "metrics/eval.json").read_text())
    for name in LEARNED:
        assert set(ev[name]["accuracy"]) == set(tasks)
    # the evaluate stage's model is exactly θ(α) from the stored coefficients
    base = load_state_dict(ws / "models/base/model.safetensors")
    tvs = load_task_vectors(ws / "artifacts/task_vectors", tasks)
    scheme, _, _, alpha, mask = lc.load_learned(ws / "artifacts/coefficients/concrete.safetensors")
    assert scheme.kind == "task" and mask and alpha.unique().numel() == 1
    merged = lc.rebuild(base, tvs, ws / "artifacts/coefficients/concrete.safetensors")
    k = next(iter(mask))
    expected = base[k] + alpha[0, 0] * sum(mask[k].float() * tvs[t][k] for t in tasks)
    torch.testing.assert_close(merged[k], expected)


def test_learned_runs_log_the_data_they_consumed(learned_ws: Path):
    con = sqlite3.connect(learned_ws / "mlflow.db")
    contexts = [
        r[0] for r in con.execute("select value from input_tags where name = 'mlflow.data.context'")
    ]
    assert any(
        c.startswith("atlas_k2 (labels used): k-shot (stratified) of val") and "k=2 seed=0" in c
        for c in contexts
    )
    # ada_layer and concrete both consumed the unlabeled test rows: one input names both runs
    both = "ada_layer (labels NOT used), concrete (labels NOT used): test n="
    assert sum(c.startswith(both) for c in contexts) == 3, contexts
    (uri,) = con.execute(
        "select artifact_uri from runs where name = 'coefficients' order by start_time desc"
    ).fetchone()
    art = Path(uri.removeprefix("file://")) / "coefficients/atlas_k2/atlas_k2.safetensors"
    assert art.is_file(), "learned coefficients are logged as an MLflow artifact"


def test_second_repro_is_a_no_op(learned_ws: Path):
    assert "Running stage" not in dvc(learned_ws, "repro").stdout
