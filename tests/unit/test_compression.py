"""TALL archive: exact reconstruction, base by reference, export, and bad archives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from mergeflow import compression, masks, tensors
from mergeflow.compression import ArchiveError
from mergeflow.io import CheckpointError, SafetensorsFile, save_state_dict
from mergeflow.models.hf import split_state_dict


def synthetic(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(64, 48, generator=g),
        "b": torch.randn(13, generator=g),
        "ids": torch.arange(4),
    }
    tvs = {
        f"t{i}": {
            k: 0.01 * torch.randn(v.shape, generator=g)
            for k, v in base.items()
            if v.is_floating_point()
        }
        for i in range(n_tasks)
    }
    return base, tvs


def build(tmp_path, include_base=False, mtl_dtype="float16", consensus_k=None):
    base, tvs = synthetic()
    mtl = tensors.sum_all(list(tvs.values()))
    m = masks.tall_masks_from_vectors(tvs, 0.4, mtl=mtl)
    packed, meta = masks.pack_masks(m)
    save_state_dict(packed, tmp_path / "masks.safetensors", metadata=meta)
    save_state_dict(base, tmp_path / "base.safetensors")
    heads = {t: {"classifier.weight": torch.ones(2, 3)} for t in tvs}
    compression.write_archive(
        tmp_path / "arc",
        tmp_path / "base.safetensors",
        mtl,
        tmp_path / "masks.safetensors",
        heads,
        include_base=include_base,
        mtl_dtype=mtl_dtype,
        consensus_k=consensus_k,
    )
    return base, mtl, m


@pytest.mark.parametrize("include_base", [True, False])
@pytest.mark.parametrize("mtl_dtype", ["float32", "float16", "bfloat16"])
def test_reconstruction_is_bit_exact(tmp_path, include_base, mtl_dtype):
    base, mtl, m = build(tmp_path, include_base, mtl_dtype)
    stored = {k: v.to(getattr(torch, mtl_dtype)) for k, v in mtl.items()}
    for t in m:
        enc, head = compression.load(
            tmp_path / "arc", t, base=None if include_base else tmp_path / "base.safetensors"
        )
        assert set(enc) == set(base)
        for k, v in base.items():
            if k in m[t]:
                assert enc[k].equal((v.float() + m[t][k].float() * stored[k].float()).to(v.dtype))
            else:
                assert enc[k].equal(v)
        assert head["classifier.weight"].equal(torch.ones(2, 3))
    assert compression.tasks_in(tmp_path / "arc") == sorted(m)


def test_half_precision_mtl_shrinks_the_archive(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build(tmp_path / "a", mtl_dtype="float32")
    build(tmp_path / "b", mtl_dtype="float16")
    assert (tmp_path / "b/arc/mtl.safetensors").stat().st_size < (
        tmp_path / "a/arc/mtl.safetensors"
    ).stat().st_size * 0.6


def test_referenced_base_must_be_given_and_match(tmp_path):
    build(tmp_path, include_base=False)
    with pytest.raises(ArchiveError, match="not stored in the archive"):
        compression.load(tmp_path / "arc", "t0")
    other = tmp_path / "other.safetensors"
    save_state_dict({"w": torch.zeros(64, 48), "b": torch.zeros(13), "ids": torch.arange(4)}, other)
    with pytest.raises(ArchiveError, match="not the base the archive was built on"):
        compression.load(tmp_path / "arc", "t0", base=other)


def test_bad_archives_fail_clearly(tmp_path):
    build(tmp_path, include_base=True)
    arc = tmp_path / "arc"
    with pytest.raises(ArchiveError, match="'nope' is not in the archive"):
        compression.load(arc, "nope")
    with pytest.raises(ArchiveError, match="no manifest"):
        compression.load(tmp_path, "t0")
    data = (arc / "mtl.safetensors").read_bytes()
    (arc / "mtl.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        compression.load(arc, "t0")
    (arc / "mtl.safetensors").write_bytes(data)
    # masks made for other shapes
    other = {
        t: {"w": torch.ones(2, 2, dtype=torch.bool), "b": torch.ones(3, dtype=torch.bool)}
        for t in ("t0", "t1", "t2")
    }
    packed, meta = masks.pack_masks(other)
    save_state_dict(packed, arc / "masks.safetensors", metadata=meta)
    with pytest.raises(ArchiveError, match="belong to other models"):
        compression.load(arc, "t0")
    (arc / "manifest.json").write_text("{not json")
    with pytest.raises(ArchiveError, match="corrupted"):
        compression.load(arc, "t0")


def test_task_without_mask_is_refused(tmp_path):
    base, tvs = synthetic(2)
    mtl = tensors.sum_all(list(tvs.values()))
    packed, meta = masks.pack_masks(masks.tall_masks_from_vectors(tvs, 0.4, mtl=mtl))
    save_state_dict(packed, tmp_path / "m.safetensors", metadata=meta)
    save_state_dict(base, tmp_path / "base.safetensors")
    heads = {t: {"h": torch.ones(1)} for t in ("t0", "t1", "t9")}
    with pytest.raises(ArchiveError, match="t9"):
        compression.write_archive(
            tmp_path / "arc", tmp_path / "base.safetensors", mtl, tmp_path / "m.safetensors", heads
        )
    assert not (tmp_path / "arc").exists()


def test_export_loads_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    base_model = BertForSequenceClassification(cfg)
    base_dir = tmp_path / "base"
    base_model.bert.save_pretrained(base_dir)
    enc0, _ = split_state_dict(base_model.state_dict(), "bert")
    experts = {}
    for i in range(2):
        m = BertForSequenceClassification(cfg)
        m.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts[f"t{i}"] = m
    tvs = {}
    heads = {}
    for t, m in experts.items():
        enc, head = split_state_dict(m.state_dict(), "bert")
        tvs[t] = tensors.task_vector(enc0, enc)
        heads[t] = head
    mtl = tensors.sum_all(list(tvs.values()))
    packed, meta = masks.pack_masks(masks.tall_masks_from_vectors(tvs, 0.0, mtl=mtl))
    save_state_dict(packed, tmp_path / "m.safetensors", metadata=meta)
    configs = {t: json.loads(m.config.to_json_string()) for t, m in experts.items()}
    compression.write_archive(
        tmp_path / "arc",
        base_dir / "model.safetensors",
        mtl,
        tmp_path / "m.safetensors",
        heads,
        configs,
        encoder_prefix="bert",
        mtl_dtype="float32",
        include_base=False,
    )
    out = compression.export(tmp_path / "arc", "t1", tmp_path / "t1", base_dir)
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    rec, head = compression.load(tmp_path / "arc", "t1", base=base_dir)
    for k, v in rec.items():
        assert loaded.bert.state_dict()[k].equal(v), k
    assert loaded.classifier.weight.equal(heads["t1"]["classifier.weight"])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_archive_is_bit_exact_and_compact(tmp_path, k):
    base, mtl, m = build(tmp_path, include_base=True, mtl_dtype="float16", consensus_k=k)
    arc = tmp_path / "arc"
    assert compression.manifest(arc)["consensus_k"] == k
    cons = masks.consensus_mask(m, k=k)
    stored = {n: v.half() for n, v in mtl.items()}
    for t in m:
        enc, _ = compression.load(arc, t)
        for n, v in base.items():
            if n in m[t]:
                keep = (m[t][n] & cons[n]).float()
                assert enc[n].equal((v.float() + keep * stored[n].float()).to(v.dtype)), (t, n)
            else:
                assert enc[n].equal(v)
    n_kept = sum(int(c.sum()) for c in cons.values())
    assert SafetensorsFile(arc / "mtl.safetensors").nbytes() == 2 * n_kept


def test_consensus_k1_is_lossless(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build(tmp_path / "a", include_base=True)
    _, _, m = build(tmp_path / "b", include_base=True, consensus_k=1)
    for t in m:
        dense, _ = compression.load(tmp_path / "a/arc", t)
        compact, _ = compression.load(tmp_path / "b/arc", t)
        assert all(dense[n].equal(compact[n]) for n in dense)


def test_masks_for_other_shapes_are_refused_before_writing(tmp_path):
    base, tvs = synthetic()
    mtl = tensors.sum_all(list(tvs.values()))
    other = {
        t: {"w": torch.ones(48, 64, dtype=torch.bool), "b": torch.ones(13, dtype=torch.bool)}
        for t in tvs
    }  # same byte count as (64, 48), other shape
    packed, meta = masks.pack_masks(other)
    save_state_dict(packed, tmp_path / "m.safetensors", metadata=meta)
    save_state_dict(base, tmp_path / "base.safetensors")
    heads = {t: {"h": torch.ones(1)} for t in tvs}
    with pytest.raises(ArchiveError, match=r"made for shape \[48, 64\].*\[64, 48\]"):
        compression.write_archive(
            tmp_path / "arc", tmp_path / "base.safetensors", mtl, tmp_path / "m.safetensors", heads
        )
    with pytest.raises(ArchiveError, match="consensus_k"):
        compression.write_archive(
            tmp_path / "arc",
            tmp_path / "base.safetensors",
            mtl,
            tmp_path / "m.safetensors",
            heads,
            consensus_k=0,
        )
    assert not (tmp_path / "arc").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "victim", ["masks.safetensors", "base.safetensors", "heads/t1.safetensors"]
)
def test_truncated_archive_files_fail_clearly(tmp_path, victim):
    build(tmp_path, include_base=True, consensus_k=2)
    f = tmp_path / "arc" / victim
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises((ArchiveError, CheckpointError), match="truncated|corrupted"):
        compression.load(tmp_path / "arc", "t1")


def test_missing_head_and_unknown_task_on_export(tmp_path):
    build(tmp_path, include_base=True)
    with pytest.raises(ArchiveError, match="'zz' is not in the archive"):
        compression.export(tmp_path / "arc", "zz", tmp_path / "out")
    (tmp_path / "arc/heads/t0.safetensors").unlink()
    with pytest.raises(ArchiveError, match="head of task 't0' is missing"):
        compression.load(tmp_path / "arc", "t0")
    assert not (tmp_path / "out").exists()


# Runs in a fresh process: iterates θ_t from the archive and samples the process's anonymous
# resident memory (RssAnon: tensors torch allocates; not the archive's file-backed mmap pages)
# after every yielded tensor. "hold" keeps every tensor (the whole model in memory): the control
# that proves the measure sees a model. Allocations ≥ 64 KiB are mmapped by glibc and unmapped on
# free (MALLOC_MMAP_THRESHOLD_), so freed tensors leave RssAnon at once.
_RSS_PROBE = """
import json, sys
from mergeflow import compression

def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("RssAnon:"))

arc, hold = sys.argv[1], sys.argv[2] == "hold"
for _ in compression.iter_task(arc, "t0"):  # warm-up: torch's one-off allocations
    pass
start, peak, held, n = anon_kib(), 0, [], 0
for _name, t in compression.iter_task(arc, "t2"):
    n += 1
    if hold:
        held.append(t)
    peak = max(peak, anon_kib() - start)
print(json.dumps({"n": n, "peak_bytes": peak * 1024}))
"""


def _anon_peak(arc, hold: bool) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(arc), "hold" if hold else "stream"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_reconstruction_streams_one_tensor_at_a_time(tmp_path):
    """Peak anonymous memory of a process streaming θ_t stays near one tensor, not the model.

    Catches: reconstructing the whole model before yielding (e.g. a list of every θ_t tensor,
    or every θ_0 tensor copied up front). Measured in a subprocess from RssAnon, which sees
    torch's allocations (``tracemalloc`` does not); the ``hold`` control shows it sees a model.
    """
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(256, 512, generator=g) for i in range(32)}
    mtl = {k: 0.01 * torch.randn(256, 512, generator=g) for k in base}
    tvs = {f"t{j}": {k: torch.rand(256, 512, generator=g) < 0.5 for k in base} for j in range(3)}
    packed, meta = masks.pack_masks(tvs)
    save_state_dict(packed, tmp_path / "m.safetensors", metadata=meta)
    save_state_dict(base, tmp_path / "base.safetensors")
    compression.write_archive(
        tmp_path / "arc",
        tmp_path / "base.safetensors",
        mtl,
        tmp_path / "m.safetensors",
        {t: {"h": torch.ones(1)} for t in tvs},
        mtl_dtype="float32",
        include_base=True,
    )
    model_bytes = sum(v.numel() * 4 for v in base.values())  # 16 MiB, one tensor 0.5 MiB
    held = _anon_peak(tmp_path / "arc", hold=True)
    streamed = _anon_peak(tmp_path / "arc", hold=False)
    assert held["n"] == streamed["n"] == 32
    assert held["peak_bytes"] > 0.9 * model_bytes, held  # the measure sees a whole model
    # one tensor is 1/32 of the model; θ_0, τ_MTL and the mask are read lazily per tensor
    assert streamed["peak_bytes"] < model_bytes / 4, streamed


def test_export_task_cli(tmp_path):
    from typer.testing import CliRunner

    from mergeflow.cli import app

    build(tmp_path, include_base=True)
    (tmp_path / "arc/configs/t0.json").write_text(json.dumps({"model_type": "bert"}))
    args = ["export-task", "--archive", str(tmp_path / "arc"), "--base", str(tmp_path / "nobase")]
    res = CliRunner().invoke(app, [*args, "--task", "zz", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "'zz' is not in the archive" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, [*args, "--task", "t0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    sd = SafetensorsFile(tmp_path / "o/model.safetensors")
    assert {"w", "b", "classifier.weight"} <= set(sd.keys())


def test_pareto_rows_cover_every_stored_form():
    from mergeflow.pipeline.evaluate import PARETO_COLUMNS, pareto_markdown, pareto_rows

    assert PARETO_COLUMNS == (
        "form",
        "setting",
        "n_tasks",
        "bytes",
        "bytes_ratio",
        "mean_accuracy",
        "mean_normalized",
    )
    s = lambda a, n: {"mean_accuracy": a, "mean_normalized": n}  # noqa: E731
    summary = {
        "expert": s(0.8, 1.0),
        "base": s(0.4, 0.5),
        "task_arithmetic": s(0.7, 0.9),
        "tall_masks": s(0.79, 0.99),
        "tall_consensus": s(0.78, 0.98),
        "twin_merging": s(0.77, 0.97),
    }
    sizes = {
        "bytes_experts": 1000,
        "bytes_merged": 130,
        "tall": {"bytes": 60, "bytes_with_base": 180},
        "tall_consensus": {"bytes": 40, "bytes_with_base": 160, "k": 2},
        "twin": {"bytes": 150, "rank": 16},
    }
    rows = pareto_rows(summary, sizes, {"task_arithmetic": {"scaling": 0.3}}, 3)
    assert all(tuple(r) == PARETO_COLUMNS for r in rows)
    got = {(r["form"], r["setting"]): (r["bytes"], r["bytes_ratio"]) for r in rows}
    assert got == {
        ("experts", "one fine-tuned model per task"): (1000, 1.0),
        ("base", "pretrained encoder + heads"): (130, 0.13),
        ("merged", "task_arithmetic λ=0.3"): (130, 0.13),
        ("tall", "θ0 by reference"): (60, 0.06),
        ("tall", "θ0 included"): (180, 0.18),
        ("tall_consensus", "k=2, θ0 by reference"): (40, 0.04),
        ("tall_consensus", "k=2, θ0 included"): (160, 0.16),
        ("twin", "rank 16"): (150, 0.15),
    }
    table = pareto_markdown(rows)
    lines = table.splitlines()[2:]
    assert lines[0].startswith("| tall_consensus |") and lines[-1].startswith("| experts |")
