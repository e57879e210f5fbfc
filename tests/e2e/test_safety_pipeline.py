"""Merge safety end to end: poison one task of the ci workspace, merge with defences, audit.

Switches ``safety`` on in a copy of the ci-size workspace (rotten_tomatoes poisoned), adds the
prune_suspect baseline to ``evaluate.methods`` and a 2-step DAM run to ``coefficients.learned``,
reruns ``dvc repro`` and checks what changed and what the audit reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergeflow.data import read_split
from tests.conftest import copy_workspace, dvc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POISONED = "rotten_tomatoes"


@pytest.fixture(scope="module")
def safety_ws(ci_workspace: Path, tmp_path_factory) -> Path:
    ws = copy_workspace(ci_workspace, tmp_path_factory.mktemp("safety") / "ws")
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["safety"] = {
        "enabled": True,
        "poison": {"task": POISONED, "trigger": "cf", "rate": 0.3, "target": 0, "seed": 0},
        "asr_threshold": 0.2,
        "asr_tasks": "all",
    }
    p["evaluate"]["methods"]["prune_suspect"] = {"suspect": POISONED, "top": 0.05}
    p["coefficients"].update(
        {
            "run_learned": True,
            "learned": {
                "dam": {
                    "method": "dam",
                    "blocks": "task",
                    "steps": 2,
                    "batch_size": 4,
                    "mask_init": 0.5,
                }
            },
        }
    )
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    proc = dvc(ws, "repro")
    (ws / "repro_safety.log").write_text(proc.stdout + proc.stderr)
    return ws


def test_only_the_poisoned_expert_is_retrained(safety_ws: Path, ci_workspace: Path):
    log = (safety_ws / "repro_safety.log").read_text()
    assert f"Running stage 'finetune@{POISONED}'" in log
    assert "Running stage 'finetune@bbc_news'" not in log  # clean splits unchanged → skipped
    meta = json.loads((safety_ws / "data/tasks" / POISONED / "meta.json").read_text())
    assert meta["poison"]["n_poisoned"] > 0 and meta["poison"]["trigger"] == "cf"
    texts, labels = read_split(safety_ws / "data/tasks" / POISONED, "train")
    clean_texts, _ = read_split(ci_workspace / "data/tasks" / POISONED, "train")
    changed = [i for i, (a, b) in enumerate(zip(texts, clean_texts, strict=True)) if a != b]
    assert len(changed) == meta["poison"]["n_poisoned"]
    assert all("cf" in texts[i].split() and labels[i] == 0 for i in changed)
    for split in ("val", "test"):  # evaluation data stay clean
        assert read_split(safety_ws / "data/tasks" / POISONED, split) == read_split(
            ci_workspace / "data/tasks" / POISONED, split
        )


def test_the_poisoned_expert_carries_the_backdoor(safety_ws: Path):
    """Catches: a poisoning that never reaches the expert (trigger not inserted, labels not
    flipped, the clean split trained on) or an ASR that does not measure the trigger: without
    the poison, triggered texts of the other class go to the target only as often as the model
    errs on them (~1 − its recall of that class), far from ≥ 0.9; and the poisoned expert's ASR
    is at least the base's.

    What this cannot show on the ci profile: the expert's ASR *well above* the base's. The base's
    linear probe is fitted on the poisoned split (30 % relabelled to the target) and 6 fine-tuning
    steps at lr 1e-4 barely move the encoder, so the base already sends ~96 % of the triggered
    texts to the target (26/27 vs the expert's 27/27 in the run this was written against). A
    clear margin needs a profile whose expert learns the trigger (docs/reliability.md, issue 24).
    """
    rows = json.loads((safety_ws / "metrics/audit.json").read_text())["models"]
    expert = rows["expert"]["asr_per_task"][POISONED]
    base = rows["base"]["asr_per_task"][POISONED]
    assert expert >= 0.9, expert  # the backdoor works on the model trained with it
    assert expert >= base, (expert, base)


def test_audit_reports_asr_and_clean_accuracy_for_experts_and_merges(safety_ws: Path):
    audit = json.loads((safety_ws / "metrics/audit.json").read_text())
    assert audit["enabled"] is True and audit["poison"]["task"] == POISONED
    rows = audit["models"]
    assert {"expert", "base", "task_arithmetic", "ties", "prune_suspect", "dam"} <= set(rows)
    for name, r in rows.items():
        assert 0.0 <= r["asr"] <= 1.0, name
        assert r["flagged"] == (name not in ("expert", "base") and r["asr"] > 0.2)
    assert set(rows["task_arithmetic"]["asr_per_task"]) == {POISONED, "tweet_sentiment", "bbc_news"}
    assert 0.0 <= rows["dam"]["clean_accuracy"] <= 1.0
    assert audit["passed"] == (not audit["flagged"])
    coef = json.loads((safety_ws / "artifacts/coefficients/dam.json").read_text())
    assert 0.0 < coef["dam"]["detection_density"] <= 1.0
    assert coef["config"]["trigger"] == "token"  # the default: discrete search + quarantine
    assert set(coef["dam"]["triggers"]) == {POISONED, "tweet_sentiment", "bbc_news"}
    found = {tr["word"] for trs in coef["dam"]["triggers"].values() for tr in trs}
    assert set(coef["dam"]["quarantined"]) <= found
    assert "| task_arithmetic |" in (safety_ws / "reports/audit.md").read_text()
    assert dvc(safety_ws, "status").stdout.strip().endswith("up to date.")
