"""LoRA and DoRA exactly as peft defines them (issue 20, item 4).

Every reference here is peft's own: adapters are built with ``get_peft_model`` on a tiny random
BERT, their A/B factors and DoRA magnitudes randomised, saved with ``save_pretrained``, and the
expected weights come from ``PeftModel.from_pretrained(...).merge_and_unload()``.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from mergeflow.compression import lora_lego as lego
from mergeflow.engine.lora import merge_lora_adapters
from mergeflow.models.lora import AdapterError, lora_delta, pattern_key, read_adapter
from mergeflow.tensors import MergeError
from tests.helpers import tiny_bert

Q0 = "bert.encoder.layer.0.attention.self.query"
# alpha_pattern / rank_pattern in the styles users write them. Under the old matching
# (re.search on the prefixed name, last match wins) the first gave ΔW 4× too small on layer 0's
# query (the anchored key never matched), the second 4× too large (peft ignores a key that does
# not match the end of a name), the third took 32 where peft takes the first key's 2.
CASES = {
    "alpha-anchored": dict(alpha_pattern={"^" + Q0: 32}),
    "alpha-substring": dict(alpha_pattern={"layer.0": 32}),
    "alpha-first-wins": dict(alpha_pattern={"query": 2, "layer.0.attention.self.query": 32}),
    "rank-pattern": dict(
        rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.value": 16}
    ),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "dora-rslora-alpha": dict(use_dora=True, use_rslora=True, alpha_pattern={"^" + Q0: 32}),
}


def tiny():
    return tiny_bert(seed=0, vocab_size=100, max_positions=32).eval()


def make_adapter(path, seed, **lora_kwargs):
    """A peft-saved adapter with random A, B (and DoRA magnitudes scaled by 1 ± 0.3)."""
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        **lora_kwargs,
    )
    pm = get_peft_model(tiny(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(path)
    return path


def peft_merged(adapter_dir) -> dict[str, torch.Tensor]:
    """peft's own answer: the dense model of ``merge_and_unload``."""
    return PeftModel.from_pretrained(tiny(), str(adapter_dir)).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base model's state dict and its safetensors file."""
    sd = {k: v.contiguous() for k, v in tiny().state_dict().items()}
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_file(sd, str(path))
    return sd, path


def assert_model_close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5, msg=k)


def test_pattern_key_is_peft_matcher():
    """Catches: re.search / last match wins instead of peft's ``(.*\\.)?(key)$``, first wins."""
    names = [Q0, "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.10.output.dense"]
    patterns = [
        ["^" + Q0],
        ["layer.0"],
        ["query", "layer.0.attention.self.query"],
        ["layer.0.attention.self.query", "query"],
        ["layer\\.1\\d\\..*dense", "dense"],
        ["^encoder.layer.0.attention.self.query"],
    ]
    for pats in patterns:
        for name in names:
            assert pattern_key(pats, name) == get_pattern_key(pats, name), (pats, name)
    assert pattern_key(["query", "layer.0.attention.self.query"], Q0) == "query"
    assert pattern_key(["layer.0"], Q0) == Q0  # no match: peft's "use the default"


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_vector_and_single_merge_equal_peft(case, base, tmp_path):
    """The pipeline's τ (``lora_delta``) and ``merge_lora_adapters`` of one adapter at weight 1
    give the weights of peft's ``merge_and_unload``."""
    sd0, base_path = base
    a = make_adapter(tmp_path / "a", seed=1, **CASES[case])
    want = peft_merged(a)
    enc = {k.removeprefix("bert."): v for k, v in sd0.items() if k.startswith("bert.")}
    delta = lora_delta(*read_adapter(a), "bert", enc)
    assert len(delta) == 4
    got = {
        k: v + delta[k.removeprefix("bert.")] if k.removeprefix("bert.") in delta else v
        for k, v in sd0.items()
    }
    assert_model_close(
        {k: got[k] for k in want if k in got}, {k: want[k] for k in want if k in got}
    )
    merge_lora_adapters({"a": a}, tmp_path / "out", scaling=1.0, base=base_path)
    assert_model_close(peft_merged(tmp_path / "out"), want)


@pytest.mark.parametrize(
    "kinds",
    [("lora", "lora"), ("dora", "dora"), ("dora", "lora")],
    ids=["lora", "dora", "dora+lora"],
)
def test_weighted_merge_is_task_arithmetic_on_peft_weights(kinds, base, tmp_path):
    """θ = θ_0 + λ Σ_t w_t (θ_t − θ_0), with θ_t from peft's merge_and_unload, a negative weight,
    rsLoRA on one adapter and an alpha_pattern on the other. For DoRA this fails if the merged
    adapter keeps an input's magnitude vector or drops the magnitudes."""
    sd0, base_path = base
    kw = {"lora": {}, "dora": {"use_dora": True}}
    a = make_adapter(tmp_path / "a", 1, use_rslora=True, **kw[kinds[0]])
    b = make_adapter(tmp_path / "b", 2, alpha_pattern={"^" + Q0: 2}, **kw[kinds[1]])
    ta, tb = peft_merged(a), peft_merged(b)
    lam, w = 0.8, {"a": 1.0, "b": -0.5}
    merge_lora_adapters({"a": a, "b": b}, tmp_path / "out", scaling=lam, weights=w, base=base_path)
    want = {k: v + lam * (w["a"] * (ta[k] - v) + w["b"] * (tb[k] - v)) for k, v in sd0.items()}
    got = peft_merged(tmp_path / "out")
    assert_model_close(got, {k: want[k] for k in got}, atol=2e-5)
    cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert cfg["use_dora"] is ("dora" in kinds)


def test_one_dora_adapter_at_half_weight(base, tmp_path):
    """The issue's case: one DoRA adapter at weight 0.5 gives θ_0 + 0.5·(θ_1 − θ_0)."""
    sd0, base_path = base
    a = make_adapter(tmp_path / "a", 3, use_dora=True)
    full = peft_merged(a)
    merge_lora_adapters({"a": a}, tmp_path / "out", scaling=0.5, base=base_path)
    got = peft_merged(tmp_path / "out")
    assert_model_close(got, {k: v + 0.5 * (full[k] - v) for k, v in sd0.items()})


def test_dora_refused_where_not_defined(base, tmp_path):
    """DoRA without the base, with a non-linear method, and in LoRA-LEGO: one message naming
    DoRA, nothing written."""
    sd0, base_path = base
    a = make_adapter(tmp_path / "a", 1, use_dora=True)
    b = make_adapter(tmp_path / "b", 2, use_dora=True)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="DoRA adapters need the base model"):
        merge_lora_adapters({"a": a, "b": b}, out, scaling=1.0)
    with pytest.raises(MergeError, match="DoRA adapters merge with task_arithmetic only"):
        merge_lora_adapters({"a": a, "b": b}, out, method="ties", base=base_path, density=0.5)
    with pytest.raises(MergeError, match="is a DoRA adapter"):
        lego.write_adapter({"a": a, "b": b}, out, rank=4)
    with pytest.raises(AdapterError, match="DoRA"):
        lora_delta(*read_adapter(a), "bert")  # the pipeline's τ needs θ_0 for DoRA
    assert not out.exists()


@pytest.mark.parametrize("case", ["alpha-anchored", "alpha-substring"])
def test_lora_lego_reproduces_one_adapter_with_alpha_pattern(case, tmp_path):
    """LoRA-LEGO with k = r on one adapter is that adapter: its scales come from the same
    resolver (an own re.search copy gave 4× off on layer 0's query)."""
    a = make_adapter(tmp_path / "a", 1, **CASES[case])
    lego.write_adapter({"a": a}, tmp_path / "out", rank=4, seed=0)
    assert_model_close(peft_merged(tmp_path / "out"), peft_merged(a))


def test_mergeflow_merge_command_merges_dora_adapters(base, tmp_path):
    """``mergeflow merge`` with peft adapters as experts: the DoRA weighted merge above, and a
    non-linear method refused with one ``error:`` line naming DoRA (exit 2, nothing written)."""
    from typer.testing import CliRunner

    from mergeflow.cli import app

    sd0, base_path = base
    a = make_adapter(tmp_path / "a", 1, use_dora=True)
    b = make_adapter(tmp_path / "b", 2, use_dora=True)
    ta, tb = peft_merged(a), peft_merged(b)
    args = ["merge", "--base", str(base_path), "--expert", f"a={a}", "--expert", f"b={b}"]
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [*args, "--method", "ties", "--out", str(out), "--set", "density=0.5"],
    )
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: DoRA adapters merge with task_arithmetic only")
    assert not out.exists()
    res = CliRunner().invoke(
        app,
        [
            *args,
            "--method",
            "task_arithmetic",
            "--out",
            str(out),
            "--set",
            "scaling=0.5",
            "--set",
            "weights={a: 1.0, b: -1.0}",
        ],
    )
    assert res.exit_code == 0, res.output
    want = {k: v + 0.5 * ((ta[k] - v) - (tb[k] - v)) for k, v in sd0.items()}
    assert_model_close(peft_merged(out), want, atol=2e-5)


@pytest.mark.parametrize("case", ["alpha-anchored", "dora"])
def test_pipeline_task_vector_equals_peft(case, base, tmp_path):
    """The task_vectors stage's τ of a LoRA-mode expert (``<expert>/adapter``) is peft's
    ``merge_and_unload`` minus θ_0 (DoRA: the stage hands θ_0 to the adapter reader)."""
    from mergeflow.pipeline.task_vectors import expert_task_vector

    sd0, _ = base
    make_adapter(tmp_path / "t" / "adapter", 1, **CASES[case])
    (tmp_path / "t" / "expert.json").write_text(json.dumps({"encoder_prefix": "bert"}))
    enc = {k.removeprefix("bert."): v for k, v in sd0.items() if k.startswith("bert.")}
    tv = expert_task_vector(enc, tmp_path / "t")
    want = peft_merged(tmp_path / "t" / "adapter")
    assert any(v.abs().max() > 0.01 for v in tv.values())
    assert_model_close(
        {k: enc[k] + tv[k] for k in tv}, {k: want["bert." + k] for k in tv}, atol=2e-5
    )


def test_gpt2_conv1d_dora_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores W as (in × out) (``fan_in_fan_out``): DoRA's norm is still per
    output feature. One DoRA adapter at weight 0.5 against peft (the pipeline's τ and a merge)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    def gpt2():
        torch.manual_seed(0)
        cfg = GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=100, pad_token_id=0
        )
        return GPT2ForSequenceClassification(cfg).eval()

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        use_dora=True,
    )
    pm = get_peft_model(gpt2(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(tmp_path / "a")
    sd0 = {k: v.contiguous() for k, v in gpt2().state_dict().items()}
    save_file(sd0, str(tmp_path / "base.safetensors"))
    full = PeftModel.from_pretrained(gpt2(), str(tmp_path / "a")).merge_and_unload().state_dict()
    enc = {
        k.removeprefix("transformer."): v for k, v in sd0.items() if k.startswith("transformer.")
    }
    delta = lora_delta(*read_adapter(tmp_path / "a"), "transformer", enc)
    assert set(delta) == {"h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"}
    for k, v in delta.items():
        torch.testing.assert_close(enc[k] + v, full["transformer." + k], atol=1e-5, rtol=1e-5)
    merge_lora_adapters(
        {"a": tmp_path / "a"}, tmp_path / "out", scaling=0.5, base=tmp_path / "base.safetensors"
    )
    got = PeftModel.from_pretrained(gpt2(), str(tmp_path / "out")).merge_and_unload().state_dict()
    assert_model_close(got, {k: v + 0.5 * (full[k] - v) for k, v in sd0.items() if k in got})


def test_adapters_merged_wrongly_as_plain_lora_are_refused():
    """A LoRA variant or tensor kind this code would silently treat as W + s·B·A is refused."""
    from mergeflow.models.lora import lora_modules

    g = torch.Generator().manual_seed(0)
    m = "base_model.model.enc.query"
    sd = {
        f"{m}.lora_A.weight": torch.randn(2, 4, generator=g),
        f"{m}.lora_B.weight": torch.randn(4, 2, generator=g),
    }
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    assert lora_modules(sd, cfg)[m].scaling == 2.0
    with pytest.raises(AdapterError, match="lora_bias"):
        lora_modules(sd, {**cfg, "lora_bias": True})
    with pytest.raises(AdapterError, match="lora_embedding_A"):
        lora_modules({**sd, "base_model.model.emb.lora_embedding_A": torch.ones(2, 5)}, cfg)
    with pytest.raises(AdapterError, match="rank 2, but its adapter_config"):
        lora_modules(sd, {**cfg, "rank_pattern": {"query": 8}})
    with pytest.raises(AdapterError, match="use_dora is not set"):
        lora_modules({**sd, f"{m}.lora_magnitude_vector": torch.ones(4)}, cfg)
    with pytest.raises(AdapterError, match="use_dora is set"):
        lora_modules(sd, {**cfg, "use_dora": True})
