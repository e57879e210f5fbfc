"""LoRA adapters merged in weight space, re-factored by SVD, loadable by peft."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from mergeflow.config import LoraCfg
from mergeflow.engine.lora import dense_deltas, merge_lora_adapters
from mergeflow.models.lora import rank_alpha, wrap_lora
from mergeflow.tensors import MergeError
from tests.helpers import tiny_bert


def tiny(seed=0):
    return tiny_bert(seed=seed, vocab_size=100, max_positions=32).eval()


def make_adapter(path, seed, r=4, alpha=8):
    pm = wrap_lora(
        tiny(), LoraCfg(r=r, alpha=alpha, target_modules=("query", "value")), "classifier"
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
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


def test_single_adapter_weight_one_reproduces_itself(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    merge_lora_adapters({"a": a}, tmp_path / "out", scaling=1.0)
    d_in = dense_deltas(*read(a))
    d_out = dense_deltas(*read(tmp_path / "out"))
    assert set(d_in) == set(d_out)
    for k in d_in:
        torch.testing.assert_close(d_out[k], d_in[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(tmp_path / "out"), logits(a), rtol=1e-5, atol=1e-5)
    cfg = read(tmp_path / "out")[1]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4


def test_two_adapters_merge_dense_delta_not_factors(tmp_path):
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    merged = merge_lora_adapters({"a": a, "b": b}, tmp_path / "out", scaling=1.0)
    da, db = dense_deltas(*read(a)), dense_deltas(*read(b))
    out = dense_deltas(*read(tmp_path / "out"))
    for k in da:
        torch.testing.assert_close(merged[k], da[k] + db[k])
        torch.testing.assert_close(out[k], da[k] + db[k], rtol=1e-4, atol=1e-4)  # rank 8: exact
    # merging A and B separately would be wrong: (B_a+B_b)(A_a+A_b)·s ≠ ΔW_a + ΔW_b
    sa, sb = read(a)[0], read(b)[0]
    k = next(iter(da))
    wrong = (
        2.0
        * (sa[k + ".lora_B.weight"] + sb[k + ".lora_B.weight"])
        @ (sa[k + ".lora_A.weight"] + sb[k + ".lora_A.weight"])
    )
    assert not torch.allclose(wrong, out[k], atol=1e-2)


def test_refactor_to_lower_rank_is_truncated_svd(tmp_path):
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    merge_lora_adapters({"a": a, "b": b}, tmp_path / "out", rank=3, scaling=0.5)
    sd, cfg = read(tmp_path / "out")
    assert cfg["r"] == 3
    da, db = dense_deltas(*read(a)), dense_deltas(*read(b))
    out = dense_deltas(sd, cfg)
    for k in da:
        full = 0.5 * (da[k] + db[k])
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(out[k], best, rtol=1e-4, atol=1e-4)
    logits(tmp_path / "out")  # peft loads it


def ties_reference(deltas: dict[str, dict[str, torch.Tensor]], density: float) -> dict:
    """TIES (Yadav et al., NeurIPS 2023) on dense ΔW, written out with a sort: per task keep the
    top ⌈density·n⌉ |ΔW| over all modules, elect γ = sgn(Σ_t), mean the agreeing entries."""
    modules = list(next(iter(deltas.values())))
    flat = torch.stack([torch.cat([d[m].reshape(-1) for m in modules]) for d in deltas.values()])
    k = math.ceil(density * flat.shape[1])
    thr = flat.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
    trimmed = flat * (flat.abs() >= thr)
    gamma = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    out, i = {}, 0
    for m in modules:
        n = deltas[next(iter(deltas))][m].numel()
        out[m] = merged[i : i + n].view_as(deltas[next(iter(deltas))][m])
        i += n
    return out


def test_ties_on_dense_deltas_and_dtype_kept(tmp_path):
    """Catches: ``method`` ignored (e.g. always task arithmetic) or TIES applied to the A/B
    factors: the merged ΔW must equal TIES on the dense ΔW_t, and the adapter its best rank-r
    approximation."""
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    sd, _ = read(a)
    sd = {k: v.half() if "lora_" in k else v for k, v in sd.items()}
    save_file(sd, str(a / "adapter_model.safetensors"))
    merged = merge_lora_adapters({"a": a, "b": b}, tmp_path / "out", method="ties", density=0.5)
    out_sd, cfg = read(tmp_path / "out")
    assert {v.dtype for k, v in out_sd.items() if "lora_" in k} == {torch.float16}
    ref = ties_reference({"a": dense_deltas(*read(a)), "b": dense_deltas(*read(b))}, 0.5)
    assert set(merged) == set(ref)
    for m in ref:
        torch.testing.assert_close(merged[m], ref[m], rtol=1e-5, atol=1e-5)
        assert (ref[m] == 0).any()  # the trim did something: TA's sum would differ here
    out = dense_deltas(out_sd, cfg)
    for m in ref:  # re-factored to rank 8 (4 + 4) by truncated SVD, stored in float16
        u, s, vh = torch.linalg.svd(ref[m])
        r = rank_alpha(cfg, m)[0]
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        torch.testing.assert_close(out[m], best, rtol=2e-2, atol=2e-2)


def test_bad_adapters(tmp_path):
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    with pytest.raises(MergeError, match="no adapters"):
        merge_lora_adapters({}, tmp_path / "out")
    sd, _ = read(b)
    key = next(k for k in sd if "classifier" in k)
    sd[key] = sd[key] + 1
    save_file(sd, str(b / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="differs between adapters"):
        merge_lora_adapters({"a": a, "b": b}, tmp_path / "out")
    (b / "adapter_model.safetensors").rename(b / "adapter_model.bin")
    with pytest.raises(MergeError, match="refused"):
        merge_lora_adapters({"a": a, "b": b}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
