"""Intervals: Wilson closed form, paired bootstrap against the normal approximation, summaries."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow import stats
from mergeflow.pipeline.evaluate import comparisons_markdown, markdown_table, summarize


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (80, 100, 0.711171, 0.866633),  # Wilson 1927 formula, computed by hand
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (500, 1000, 0.469069, 0.530931),
    ],
)
def test_wilson_closed_form(k, n, lo, hi):
    got = stats.wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-6) and got[1] == pytest.approx(hi, abs=1e-6)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="outside"):
        stats.wilson(11, 10)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_matches_normal_approximation():
    # a right on all 400 texts, b wrong on 40 of them: paired difference 0.1 with
    # standard error sqrt(0.1 * 0.9 / 400) = 0.015 -> interval about 0.1 ± 0.029
    a = {"t": torch.ones(400, dtype=torch.bool)}
    b = {"t": torch.arange(400) >= 40}
    out = stats.paired_bootstrap(a, b, samples=4000, seed=1)
    assert out["diff"] == pytest.approx(0.1)
    half = 1.96 * math.sqrt(0.1 * 0.9 / 400)
    assert out["ci"][0] == pytest.approx(0.1 - half, abs=0.006)
    assert out["ci"][1] == pytest.approx(0.1 + half, abs=0.006)
    assert out["within_noise"] is False


def test_pairing_makes_a_shared_error_irrelevant():
    # both wrong on the same 200 of 400 texts, b also wrong on 4 more: unpaired intervals
    # (±0.05 each) overlap, the paired one excludes 0 — the point of pairing
    a = {"t": torch.arange(400) >= 200}
    b = {"t": torch.arange(400) >= 204}
    out = stats.paired_bootstrap(a, b, samples=2000, seed=0)
    assert out["diff"] == pytest.approx(0.01)
    assert out["ci"][0] > 0 and out["within_noise"] is False
    same = stats.paired_bootstrap(a, a)
    assert same["ci"] == [0.0, 0.0] and same["within_noise"] is True


def test_bootstrap_normalizes_per_replicate_and_checks_shapes():
    g = torch.Generator().manual_seed(0)
    expert = {"x": torch.rand(300, generator=g) < 0.8, "y": torch.rand(200, generator=g) < 0.7}
    boot = stats.bootstrap({"expert": expert, "copy": expert}, reference="expert", seed=3)
    assert boot.interval("copy", normalized=True) == pytest.approx([1.0, 1.0])
    lo, hi = boot.interval("expert")
    mean = (expert["x"].float().mean() + expert["y"].float().mean()) / 2
    assert lo < float(mean) < hi and hi - lo < 0.12
    with pytest.raises(ValueError, match="number of texts"):
        stats.bootstrap({"a": {"x": torch.ones(3)}, "b": {"x": torch.ones(4)}})
    with pytest.raises(ValueError, match="tasks"):
        stats.bootstrap({"a": {"x": torch.ones(3)}, "b": {"y": torch.ones(3)}})
    again = stats.bootstrap({"expert": expert, "copy": expert}, reference="expert", seed=3)
    assert torch.equal(again.mean_accuracy, boot.mean_accuracy)  # same seed, same replicates


def _rows() -> dict[str, dict[str, torch.Tensor]]:
    n = 1000
    i = torch.arange(n)
    return {
        "expert": {"a": i >= 100, "b": i >= 200},  # 0.9, 0.8
        "base": {"a": i >= 300, "b": i >= 400},  # 0.7, 0.6
        "ties": {"a": i >= 110, "b": i >= 210},  # a hair below the expert
        "task_arithmetic": {"a": i >= 112, "b": i >= 212},  # 0.2 points below TIES
    }


def test_summarize_records_intervals_and_calls_noise():
    s = summarize(_rows(), samples=1000, seed=0)
    assert s["base"]["accuracy"] == {"a": 0.7, "b": 0.6}
    assert s["base"]["n_test"] == {"a": 1000, "b": 1000}
    lo, hi = s["base"]["accuracy_ci"]["a"]
    assert (lo, hi) == pytest.approx(stats.wilson(700, 1000))
    assert s["expert"]["mean_normalized"] == 1.0 and s["expert"]["mean_normalized_ci"] == [1, 1]
    # base vs ties: far apart; ties vs task arithmetic: 2 of 1000 texts per task -> still a
    # paired difference (a subset of the same errors), base vs expert clearly apart
    assert s["ties"]["paired"]["base"]["within_noise"] is False
    assert s["ties"]["paired"]["base"]["diff"] == pytest.approx(
        s["ties"]["mean_normalized"] - s["base"]["mean_normalized"]
    )
    table = markdown_table(s, ["a", "b"])
    assert "a (n=1000)" in table and "0.700 [0.671, 0.728]" in table
    md = comparisons_markdown(s, ["ties", "task_arithmetic"])
    assert "Best single merged model: **ties**" in md
    assert "| task_arithmetic |" in md


def test_summary_says_within_noise_when_the_interval_holds_zero():
    rows = _rows()
    g = torch.Generator().manual_seed(1)
    # two merges that disagree on random texts, equally often right: no detectable difference
    flip = torch.rand(1000, generator=g) < 0.5
    rows["ties"] = {"a": torch.where(flip, rows["expert"]["a"], ~rows["expert"]["a"]),
                    "b": rows["expert"]["b"]}  # fmt: skip
    rows["task_arithmetic"] = {"a": torch.where(~flip, rows["expert"]["a"], ~rows["expert"]["a"]),
                               "b": rows["expert"]["b"]}  # fmt: skip
    s = summarize(rows, samples=1000, seed=0)
    p = s["ties"]["paired"]["task_arithmetic"]
    assert p["ci"][0] < 0 < p["ci"][1] and p["within_noise"] is True
    assert "within noise" in comparisons_markdown(s, ["ties", "task_arithmetic"])
