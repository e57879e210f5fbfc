"""Tiny real HF models (BERT architecture, random init) through training, LoRA and inference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mergeflow.config import PACKAGED_MINILM, LoraCfg
from mergeflow.models.hf import (
    ModelError,
    head_module,
    load_encoder_into,
    resolve_model_path,
    split_state_dict,
)
from mergeflow.models.inference import TaskModels, accuracy, tokenize
from mergeflow.models.lora import lora_delta, wrap_lora
from mergeflow.models.train import finetune
from tests.helpers import tiny_bert

TEXTS = ["good movie", "great film", "loved it", "bad movie", "awful film", "hated it"] * 4
LABELS = [1, 1, 1, 0, 0, 0] * 4


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))


def tiny(num_labels=2, seed=0):
    return tiny_bert(num_labels, seed)


def test_resolve_model_path(tmp_path):
    assert resolve_model_path(PACKAGED_MINILM).endswith("model")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="unknown packaged model"):
        resolve_model_path("packaged:gpt-17")
    assert resolve_model_path("org/some-model") == "org/some-model"


def test_split_and_head():
    m = tiny()
    enc, head = split_state_dict(m.state_dict(), m.base_model_prefix)
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert set(enc) == set(m.base_model.state_dict())
    assert head_module(m) is m.classifier


def test_finetune_learns_and_is_deterministic(tok):
    kw = dict(
        steps=30,
        batch_size=8,
        lr=3e-3,
        weight_decay=0.0,
        warmup_ratio=0.1,
        max_length=16,
        device="cpu",
        seed=0,
        probe_epochs=20,
    )
    m1, m2 = tiny(), tiny()
    r1 = finetune(m1, tok, TEXTS, LABELS, **kw)
    r2 = finetune(m2, tok, TEXTS, LABELS, **kw)
    assert r1.losses == r2.losses
    assert sum(r1.losses[-5:]) / 5 < sum(r1.losses[:5]) / 5
    assert accuracy(m1, tokenize(tok, TEXTS, LABELS, max_length=16, batch_size=5)) >= 0.9


def test_task_models_swap_encoders(tok):
    a, b = tiny(seed=1), tiny(seed=2)
    batches = tokenize(tok, TEXTS, LABELS, max_length=16, batch_size=7)
    tm = TaskModels({"a": a, "b": b})
    enc_b = {k: v.clone() for k, v in b.base_model.state_dict().items()}
    tm.set_encoder(enc_b, ["a"])
    for k, v in a.base_model.state_dict().items():
        assert v.equal(enc_b[k])
    with pytest.raises(ModelError, match="do not fit"):
        load_encoder_into(a, {"nope": torch.zeros(1)})
    assert 0.0 <= tm.accuracy("a", batches) <= 1.0


def test_scoring_pass_yields_the_router_features_bitwise(tok):
    """The evaluate stage takes Twin-Merging's router inputs φ(x) from the scoring pass of its
    shared merge instead of a second forward pass: the same numbers, and the same accuracy."""
    from mergeflow.pipeline.context import MergeContext

    a, b = tiny(seed=1), tiny(seed=2)
    enc = {k: v.clone() for k, v in tiny(seed=3).base_model.state_dict().items()}
    batches = {t: tokenize(tok, TEXTS[i:], LABELS[i:], max_length=16, batch_size=5)
               for i, t in enumerate(("a", "b"))}
    ctx = MergeContext(cfg=None, tasks=["a", "b"], base=enc, task_vectors={},
                       models=TaskModels({"a": a, "b": b}), tokenizer=tok)
    feats: dict = {}
    acc = ctx.score(enc, batches, features=feats)
    assert acc == ctx.score(enc, batches)
    for t in ("a", "b"):
        assert len(feats[t]) == len(list(batches[t]))
        for j, batch in enumerate(batches[t]):
            assert torch.equal(feats[t][j], ctx.pooled_features(enc, [batch]))


def test_base_row_scores_with_probe_heads_and_restores_the_experts_heads(tok):
    """The evaluate stage's base row: θ_0 under each task's linear-probe head, not the expert's;
    the experts' heads are back in place afterwards (later rows are scored with them)."""
    from mergeflow.pipeline.context import MergeContext

    a, b = tiny(seed=1), tiny(seed=2)
    enc = {k: v.clone() for k, v in tiny(seed=3).base_model.state_dict().items()}
    batches = {t: tokenize(tok, TEXTS, LABELS, max_length=16, batch_size=5) for t in ("a", "b")}
    ctx = MergeContext(cfg=None, tasks=["a", "b"], base=enc, task_vectors={},
                       models=TaskModels({"a": a, "b": b}), tokenizer=tok)
    own = ctx.correct(enc, batches)
    # a head that always predicts class 1 (bias only): correct exactly where the label is 1
    heads = {t: {"classifier.weight": torch.zeros(2, 32), "classifier.bias": torch.tensor([0., 1.])}
             for t in ("a", "b")}  # fmt: skip
    probe = ctx.correct_with_heads(enc, batches, heads)
    gold = torch.cat([bt.labels for bt in batches["a"]])
    for t in ("a", "b"):
        assert torch.equal(probe[t], gold == 1)
        assert torch.equal(ctx.correct(enc, batches)[t], own[t])  # experts' heads restored
    with pytest.raises(ValueError, match="head of task"):
        ctx.correct_with_heads(enc, batches, {t: {"nope": torch.zeros(1)} for t in ("a", "b")})


def test_lora_delta_equals_peft_merge(tmp_path):
    m = tiny()
    base_enc = {k: v.clone() for k, v in m.base_model.state_dict().items()}
    pm = wrap_lora(m, LoraCfg(r=4, alpha=8, target_modules=("query", "value")), "classifier")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(tmp_path / "adapter")
    from mergeflow.models.lora import read_adapter

    sd, cfg = read_adapter(tmp_path / "adapter")
    delta = lora_delta(sd, cfg, "bert")
    merged = pm.merge_and_unload()
    enc = merged.base_model.state_dict()
    assert delta, "no LoRA deltas found"
    for k, v in base_enc.items():
        d = delta.get(k, torch.zeros_like(v, dtype=torch.float32))
        torch.testing.assert_close(enc[k].float(), v.float() + d, atol=1e-5, rtol=1e-5)
    assert any("query" in k for k in delta) and any("value" in k for k in delta)
