"""The whole pipeline on the ci-size config: dvc repro, outputs, lineage, idempotence."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergeflow import compression, masks
from mergeflow.io import load_state_dict
from tests.conftest import BIN, copy_workspace, dvc, make_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_all_six_stages_produce_their_artifacts(ci_workspace: Path):
    ws = ci_workspace
    tasks = yaml.safe_load((ws / "params.yaml").read_text())["tasks"]
    for t in tasks:
        meta = json.loads((ws / "data/tasks" / t / "meta.json").read_text())
        assert set(meta["sha256"]) == {"train", "val", "test"}
        assert (ws / "models/experts" / t / "model.safetensors").is_file()
        probe = load_state_dict(ws / "models/experts" / t / "probe_head.safetensors")
        assert set(probe) == {"classifier.weight", "classifier.bias"}  # the base row's head
        assert (ws / "artifacts/task_vectors" / f"{t}.safetensors").is_file()
    summary = json.loads((ws / "artifacts/masks/masks.json").read_text())
    assert set(summary["lambda"]) == set(tasks)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    coef = json.loads((ws / "artifacts/coefficients/coefficients.json").read_text())
    assert set(coef) == set(params["evaluate"]["methods"]) | set(params["coefficients"]["learned"])
    comp = json.loads((ws / "metrics/compress.json").read_text())
    assert comp["n_tasks"] == len(tasks)
    assert 0 < comp["tall"]["bytes"] < comp["tall"]["bytes_with_base"] < comp["bytes_experts"]
    assert 0 < comp["twin"]["bytes"] < comp["bytes_experts"]
    assert 0.0 <= comp["twin"]["router_val_accuracy"] <= 1.0
    ev = json.loads((ws / "metrics/eval.json").read_text())
    for row in (
        "expert",
        "base",
        "task_arithmetic",
        "ties",
        "consensus",
        "tall_masks",
        "twin_merging",
    ):
        assert set(ev[row]["accuracy"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in ev[row]["accuracy"].values())
    assert ev["expert"]["mean_normalized"] == pytest.approx(1.0)
    for row in ev.values():  # intervals (issue 17): Wilson per task, bootstrap of the means
        for t in tasks:
            lo, hi = row["accuracy_ci"][t]
            assert lo <= row["accuracy"][t] <= hi and row["n_test"][t] == params["data"]["n_test"]
        lo, hi = row["mean_normalized_ci"]
        assert lo <= row["mean_normalized"] <= hi
    assert set(ev["ties"]["paired"]) == set(ev) - {"ties"}
    assert (ws / "reports/summary.md").read_text().count("\n|") >= 7
    # the ci profile poisons one task: the audit ran (tests/e2e/test_safety_pipeline.py)
    assert json.loads((ws / "metrics/audit.json").read_text())["enabled"] is True


MERGES = ("task_arithmetic", "ties", "consensus", "tall_masks", "twin_merging")
GRID_MERGES = ("task_arithmetic", "ties", "consensus")  # one merged encoder for every task


def _above(ev: dict, a: str, b: str, task: str) -> bool:
    """Row ``a`` beats row ``b`` on ``task`` beyond the noise: 95 % Wilson intervals disjoint."""
    return ev[a]["accuracy_ci"][task][0] > ev[b]["accuracy_ci"][task][1]


def judge_against_base(ev: dict, tasks: list[str]) -> None:
    """The accuracy claims of the ci run, from ``metrics/eval.json`` and its intervals.

    1. The experts learn: their mean normalized accuracy is above the base's over the same test
       texts (paired bootstrap interval above 0), and on at least one task an expert beats the
       base beyond the noise (95 % Wilson intervals disjoint).
    2. Nothing damages the model: on no task may an expert or a merge lie below the base beyond
       the noise, and no merge's mean normalized accuracy below the base's (paired interval).
    3. Merging keeps what the experts learned: on every task where the expert beats the base
       beyond the noise, at least one merge into one encoder (TA, TIES, consensus) scores above
       the base.
    """
    assert ev["expert"]["paired"]["base"]["ci"][0] > 0.0, ev["expert"]["paired"]["base"]
    learned = [t for t in tasks if _above(ev, "expert", "base", t)]
    assert learned, {t: (ev["base"]["accuracy_ci"][t], ev["expert"]["accuracy_ci"][t]) for t in tasks}
    for t in tasks:
        for row in ("expert", *MERGES):
            assert not _above(ev, "base", row, t), (row, t, ev[row]["accuracy_ci"][t])
    for m in MERGES:
        assert ev[m]["paired"]["base"]["ci"][1] >= 0.0, (m, ev[m]["paired"]["base"])
    for t in learned:
        assert any(ev[m]["accuracy"][t] > ev["base"]["accuracy"][t] for m in GRID_MERGES), t


def test_experts_and_merges_are_judged_against_the_base_with_their_noise(ci_workspace: Path):
    """Catches: experts that learn nothing (claim 1 of :func:`judge_against_base`); a merge that
    damages the model, e.g. a TA that adds θ_t instead of τ_t (claim 2); merges that keep none
    of the experts' gain (claim 3). Mutations tried: docs/reliability.md.

    The ci profile makes the claims testable: 256 training texts, 60 LP-FT steps and 200 test
    texts per task, where bbc_news's expert cleared its linear-probe base by more than the noise
    (0.955 [0.917, 0.976] vs 0.825 [0.766, 0.871], measured in-process on the same split).
    """
    ev = json.loads((ci_workspace / "metrics/eval.json").read_text())
    tasks = yaml.safe_load((ci_workspace / "params.yaml").read_text())["tasks"]
    judge_against_base(ev, tasks)


def test_tall_archive_reconstructs_masked_experts_exactly(ci_workspace: Path):
    ws = ci_workspace
    task = yaml.safe_load((ws / "params.yaml").read_text())["tasks"][0]
    packed = ws / "artifacts/masks/tall_masks.safetensors"
    from mergeflow.io import SafetensorsFile

    f = SafetensorsFile(packed)
    m = masks.unpack_masks(dict(f.items()), f.metadata)[task]
    base = load_state_dict(ws / "models/base/model.safetensors")
    mtl = load_state_dict(ws / "artifacts/compressed/mtl.safetensors")
    enc, head = compression.load(ws / "artifacts/compressed", task, base=ws / "models/base")
    for k, v in base.items():
        if k in m:
            expected = (v.float() + m[k].float() * mtl[k].float()).to(v.dtype)
            assert enc[k].equal(expected), k
        else:
            assert enc[k].equal(v), k
    assert "classifier.weight" in head


def _out_mtimes(ws: Path) -> dict[str, int]:
    """mtime (ns) of every file under every ``outs`` path of ``dvc.lock``."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    files = {}
    for stage in lock.values():
        for out in stage.get("outs", []):
            p = ws / out["path"]
            for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
                files[str(f.relative_to(ws))] = f.stat().st_mtime_ns
    return files


def test_second_repro_does_nothing(ci_workspace: Path):
    """Catches: a stage that reruns (or rewrites its outputs) although nothing changed — judged
    by which stages ran and by the outputs' mtimes, not by a wall-clock bound."""
    before = _out_mtimes(ci_workspace)
    proc = dvc(ci_workspace, "repro")
    assert "Running stage" not in proc.stdout
    assert "up to date" in proc.stdout
    assert before and _out_mtimes(ci_workspace) == before


def test_mlflow_records_lineage_per_stage(ci_workspace: Path):
    db = ci_workspace / "mlflow.db"
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("select name from runs")}
    assert {"base", "task_vectors", "masks", "coefficients", "compress", "evaluate"} <= names
    assert any(n.startswith("finetune@") for n in names)
    tags = dict(
        con.execute(
            "select t.key, t.value from tags t join runs r on r.run_uuid=t.run_uuid "
            "where r.name='evaluate'"
        ).fetchall()
    )
    assert len(tags["mlflow.source.git.commit"]) >= 40
    assert "input.coefficients.md5" in tags and "output.metrics.md5" in tags
    metrics = {
        r[0]
        for r in con.execute(
            "select m.key from metrics m join runs r on r.run_uuid=m.run_uuid where r.name='evaluate'"
        )
    }
    assert "task_arithmetic.mean_normalized" in metrics
    params = {
        r[0]
        for r in con.execute(
            "select p.key from params p join runs r on r.run_uuid=p.run_uuid where r.name like 'finetune@%'"
        )
    }
    assert "finetune.lr" in params
    inputs = con.execute("select count(*) from inputs").fetchone()[0]
    assert inputs > 0


def test_bad_params_fail_clearly_without_outputs(tmp_path: Path):
    ws = make_workspace(tmp_path, {"finetune": {"steps": -3}, "tasks": ["rotten_tomatoes"]})
    proc = subprocess.run(
        [sys.executable, "stages/base.py", "--out", "models/base"],
        cwd=ws,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "finetune.steps" in proc.stderr and "-3" in proc.stderr
    assert not (ws / "models").exists()


def test_unknown_task_fails_clearly(tmp_path: Path):
    ws = make_workspace(tmp_path, {"tasks": ["rotten_tomatoes", "no_such_task"]})
    proc = subprocess.run(
        [str(BIN / "python"), "stages/prepare.py", "--task", "no_such_task", "--out", "data/x"],
        cwd=ws,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no_such_task" in proc.stderr and "rotten_tomatoes" in proc.stderr
    assert not (ws / "data").exists()


def test_lora_experts_give_dense_task_vectors(ci_workspace: Path, tmp_path: Path):
    """On a copy of the ci workspace (its prepared data and base are reused: only the two LoRA
    fine-tunes and task_vectors run)."""
    ws = copy_workspace(ci_workspace, tmp_path / "ws")
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["tasks"] = ["rotten_tomatoes", "bbc_news"]
    p["finetune"].update({"mode": "lora", "steps": 4})
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    log = dvc(ws, "repro", "task_vectors").stdout
    assert "Running stage 'base'" not in log and "Running stage 'prepare@" not in log
    base = load_state_dict(ws / "models/base/model.safetensors")
    for t in ("rotten_tomatoes", "bbc_news"):
        assert (ws / "models/experts" / t / "adapter" / "adapter_model.safetensors").is_file()
        tv = load_state_dict(ws / "artifacts/task_vectors" / f"{t}.safetensors")
        expert = load_state_dict(ws / "models/experts" / t / "model.safetensors")
        changed = [k for k, v in tv.items() if v.abs().max() > 0]
        assert changed and all(k.endswith(".weight") for k in changed)
        assert any("attention.self.query" in k for k in changed)
        assert not any("LayerNorm" in k or "embeddings" in k for k in changed)
        for k, v in tv.items():
            # the saved expert is the peft merge of the same adapter: θ_t − θ_0 ≈ B·A·α/r
            diff = expert[f"bert.{k}"].float() - base[k].float()
            assert (diff - v).abs().max() < 1e-5, k


def test_missing_base_model_fails_clearly(tmp_path: Path):
    ws = make_workspace(tmp_path, {"base_model": {"name_or_path": "/nonexistent/model"}})
    proc = subprocess.run(
        [sys.executable, "stages/base.py", "--out", "models/base"],
        cwd=ws,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "base_model.name_or_path" in proc.stderr and "/nonexistent/model" in proc.stderr
    assert not (ws / "models").exists()
