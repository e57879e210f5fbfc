"""LoRA-LEGO: rank-1 units, seeded k-means, norm-preserving cluster merge, peft round trip."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from mergeflow.compression import lora_lego as lego
from mergeflow.config import LoraCfg
from mergeflow.engine.lora import dense_deltas
from mergeflow.models.lora import wrap_lora
from mergeflow.tensors import MergeError
from tests.helpers import tiny_bert


def tiny(seed=0):
    return tiny_bert(seed=seed, vocab_size=100, max_positions=32).eval()


def make_adapter(path, seed, r=4, alpha=8, head_seed=None):
    pm = wrap_lora(
        tiny(), LoraCfg(r=r, alpha=alpha, target_modules=("query", "value")), "classifier"
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif head_seed is not None and "classifier" in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(head_seed)))
    pm.save_pretrained(path)
    return path


def read(path):
    return load_file(str(path / "adapter_model.safetensors")), json.loads(
        (path / "adapter_config.json").read_text()
    )


def logits(adapter_dir):
    m = PeftModel.from_pretrained(tiny(), str(adapter_dir)).eval()
    ids = torch.arange(2 * 12).reshape(2, 12) % 100
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_one_adapter_with_k_equal_rank_reproduces_it(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=8)
    info = lego.write_adapter({"a": a}, tmp_path / "out", rank=4, seed=0)
    assert info["module_ranks"] == {4: 4} and info["dropped_tensors"] == []
    d_in, d_out = dense_deltas(*read(a)), dense_deltas(*read(tmp_path / "out"))
    assert d_in.keys() == d_out.keys()
    for m in d_in:
        torch.testing.assert_close(d_out[m], d_in[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(tmp_path / "out"), logits(a), atol=1e-5, rtol=1e-5)


def test_clustering_is_seeded_and_deterministic(tmp_path):
    ads = {t: make_adapter(tmp_path / t, seed=i) for i, t in enumerate("abc")}
    lego.write_adapter(ads, tmp_path / "x", rank=4, seed=3)
    lego.write_adapter(ads, tmp_path / "y", rank=4, seed=3)
    x, y = read(tmp_path / "x")[0], read(tmp_path / "y")[0]
    assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
    units = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    assert lego.kmeans(units, 5, seed=1).equal(lego.kmeans(units, 5, seed=1))


def test_merged_adapter_loads_with_peft_at_target_rank(tmp_path):
    ads = {t: make_adapter(tmp_path / t, seed=i, head_seed=i) for i, t in enumerate("ab")}
    info = lego.write_adapter(ads, tmp_path / "out", rank=3, seed=0)
    sd, cfg = read(tmp_path / "out")
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and cfg["modules_to_save"] is None
    assert info["dropped_tensors"] and not any("classifier" in k for k in sd)
    assert all(v.shape[0] == 3 for k, v in sd.items() if k.endswith("lora_A.weight"))
    assert logits(tmp_path / "out").shape == (2, 2)


def test_identical_adapters_merge_to_one_not_their_sum():
    g = torch.Generator().manual_seed(0)
    sd = {
        "m.lora_A.weight": torch.randn(3, 6, generator=g),
        "m.lora_B.weight": torch.randn(5, 3, generator=g),
    }
    cfg = {"lora_alpha": 6, "r": 3}  # s = α/r = 2: ΔW of one adapter is 2·B·A
    out, ranks = lego.lora_lego({"a": (sd, cfg), "b": (sd, cfg)}, rank=3, seed=0)
    assert ranks == {"m": 3}
    torch.testing.assert_close(
        out["m.lora_B.weight"] @ out["m.lora_A.weight"],
        2.0 * sd["m.lora_B.weight"] @ sd["m.lora_A.weight"],  # one adapter's ΔW, not 2 ΔW
        atol=1e-5,
        rtol=1e-5,
    )


def test_cluster_centroid_is_rescaled_to_the_mean_norm():
    # two units in one cluster: u1 = (1, 0 | 1, 0), u2 = (0, 3 | 0, 3) → centroid (.5, 1.5 | .5, 1.5)
    units = torch.tensor([[1.0, 0, 1, 0], [0, 3.0, 0, 3]])
    b, a = lego.lego_module(units, n_in=2, rank=1, seed=0)
    c = torch.cat([a[0], b[:, 0]])
    assert float(c.norm()) == pytest.approx(float(units.norm(dim=1).mean()))
    assert torch.allclose(c / c.norm(), torch.tensor([0.5, 1.5, 0.5, 1.5]) / (5.0**0.5))


def test_units_sum_to_the_adapter_delta_and_are_balanced():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g), 0.01 * torch.randn(9, 4, generator=g)
    u = lego.split_units(a, b, scale=2.5)
    ua, ub = u[:, :7], u[:, 7:]
    torch.testing.assert_close(ub.T @ ua, 2.5 * b @ a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ua.norm(dim=1), ub.norm(dim=1))


def test_kmeans_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 10
    x = torch.cat([c + 0.1 * torch.randn(8, 3, generator=g) for c in centers])
    assign = lego.kmeans(x, 3, seed=0)
    groups = [set(assign[i * 8 : (i + 1) * 8].tolist()) for i in range(3)]
    assert all(len(s) == 1 for s in groups) and len(set.union(*groups)) == 3


def test_bad_input(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    sd, cfg = read(a)
    with pytest.raises(MergeError, match="at least one"):
        lego.lora_lego({}, 2)
    with pytest.raises(MergeError, match="rank must be an int >= 1"):
        lego.lora_lego({"a": (sd, cfg)}, 0)
    fewer = {k: v for k, v in sd.items() if "value" not in k}
    with pytest.raises(MergeError, match="targets other modules"):
        lego.lora_lego({"a": (sd, cfg), "b": (fewer, cfg)}, 2)
    with pytest.raises(MergeError, match="different base models"):
        lego.lora_lego({"a": (sd, cfg), "b": (sd, {**cfg, "base_model_name_or_path": "x"})}, 2)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled/adapter_model.bin").write_bytes(b"x")
    with pytest.raises(Exception, match="safetensors"):
        lego.write_adapter({"p": tmp_path / "pickled"}, tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from mergeflow.cli import app

    ads = [str(make_adapter(tmp_path / t, seed=i)) for i, t in enumerate("ab")]
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["lora-lego", *ads, "--out", str(out), "--rank", "0"])
    assert res.exit_code == 2 and "rank must be" in " ".join(res.output.split())
    assert not out.exists()
    res = CliRunner().invoke(app, ["lora-lego", *ads, "--out", str(out), "--rank", "5"])
    assert res.exit_code == 0, res.output
    assert read(out)[1]["r"] == 5


def test_compress_stage_lego_form(tmp_path):
    """The compress stage's LoRA-LEGO form: a peft adapter + heads for lora experts, a note else."""
    from mergeflow.config import parse_params
    from mergeflow.models.lora import lora_delta, read_adapter
    from mergeflow.pipeline.compress import write_lego

    tasks = ["rotten_tomatoes", "bbc_news"]
    for i, t in enumerate(tasks):
        make_adapter(tmp_path / "experts" / t / "adapter", seed=i, r=4)
    heads = {t: {"classifier.weight": torch.full((2, 32), float(i))} for i, t in enumerate(tasks)}
    raw = {"tasks": tasks, "finetune": {"mode": "lora", "lora": {"r": 4}}, "compress": {}}
    info = write_lego(parse_params(raw, source="test"), tmp_path / "experts", heads, tmp_path / "l")
    assert info["built"] and info["rank"] == 4 and info["units_pooled"] == 2 * 4 * 4
    delta = lora_delta(*read_adapter(tmp_path / "l/adapter"), "bert")
    assert "encoder.layer.0.attention.self.query.weight" in delta
    assert set(p.name for p in (tmp_path / "l/heads").iterdir()) == {
        f"{t}.safetensors" for t in tasks
    }
    raw["finetune"]["mode"] = "full"
    info = write_lego(parse_params(raw, source="test"), tmp_path / "experts", heads, tmp_path / "f")
    assert not info["built"] and sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "manifest.json"
    ]
