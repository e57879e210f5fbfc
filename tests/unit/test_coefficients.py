"""Learned coefficients on tiny real BERTs: the functional merge, the loop, sampling, storage, errors."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from mergeflow import coefficients as lc
from mergeflow.coefficients.train import binary_mask, sample_mask
from mergeflow.config import PACKAGED_MINILM, ConfigError, LearnedCfg, parse_params
from mergeflow.models.hf import load_encoder_into, resolve_model_path, split_state_dict
from tests.helpers import tiny_bert

TEXTS = {
    "sent": (["good movie", "great film", "loved it", "bad movie", "awful film", "hated it"] * 3),
    "topic": (["the match ended", "a goal scored", "stocks fell", "markets rose", "new phone"] * 3),
}
LABELS = {"sent": [1, 1, 1, 0, 0, 0] * 3, "topic": [0, 0, 1, 1, 2] * 3}
NUM_LABELS = {"sent": 2, "topic": 3}
SCHEMES = [lc.BlockScheme("task"), lc.BlockScheme("layer"), lc.BlockScheme("atlas", 3, 7)]


def tiny(num_labels: int, seed: int) -> BertForSequenceClassification:
    return tiny_bert(num_labels, seed).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))


@pytest.fixture(scope="module")
def setup(tok):
    """θ_0, two experts (θ_0 + a random τ_t, own head each), their task models and data."""
    base_model = tiny(2, 0)
    base, _ = split_state_dict(base_model.state_dict(), "bert")
    base = {k: v.clone() for k, v in base.items()}
    tvs, models = {}, {}
    for i, t in enumerate(TEXTS):
        g = torch.Generator().manual_seed(10 + i)
        tvs[t] = {
            k: 0.05 * torch.randn(v.shape, generator=g)
            for k, v in base.items()
            if v.is_floating_point()
        }
        models[t] = tiny(NUM_LABELS[t], 1 + i)
    data = {t: lc.Examples(tok, TEXTS[t], LABELS[t], max_length=16) for t in TEXTS}
    return base, tvs, models, data


def logits_with_encoder(model, encoder, inputs):
    m = tiny(model.config.num_labels, 0)
    m.load_state_dict(model.state_dict())
    load_encoder_into(m, encoder)
    with torch.no_grad():
        return m(**inputs).logits


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.kind)
def test_zero_alpha_is_base_and_one_hot_is_expert(setup, scheme):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, scheme)
    inputs, _ = data["topic"].batch(torch.arange(5), fm.device)
    with torch.no_grad():
        got = lc.functional_logits(models["topic"], "bert", fm.merged(fm.full_alpha(0.0)), inputs)
    torch.testing.assert_close(got, logits_with_encoder(models["topic"], base, inputs))
    expert = {k: base[k] + tvs["topic"][k] if k in tvs["topic"] else base[k] for k in base}
    with torch.no_grad():
        enc = fm.merged(fm.one_hot_alpha("topic"))
        got = lc.functional_logits(models["topic"], "bert", enc, inputs)
    torch.testing.assert_close(got, logits_with_encoder(models["topic"], expert, inputs))
    for k in tvs["sent"]:
        torch.testing.assert_close(enc[k], expert[k])


def test_layer_alpha_is_applied_per_layer_and_task(setup):
    """Catches: a layer-wise α applied with one layer's column for every tensor
    (``alpha[:, 0]``), or with tasks/layers swapped — every (task, tensor) has its own α here."""
    base, tvs, _, _ = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("layer"))
    n_t, n_l = fm.alpha_shape
    assert n_l == len(fm.keys) > 1
    alpha = 0.1 + torch.arange(n_t * n_l, dtype=torch.float32).view(n_t, n_l) / (n_t * n_l)
    assert alpha.unique().numel() == n_t * n_l  # distinct per task and per layer
    enc = fm.merged(alpha)
    for i, k in enumerate(fm.keys):
        want = base[k] + sum(alpha[j, i] * tvs[t][k] for j, t in enumerate(fm.tasks))
        torch.testing.assert_close(enc[k], want, rtol=1e-6, atol=1e-6, msg=k)
    for k in base:
        if k not in fm.keys:
            assert torch.equal(enc[k], base[k])


def test_atlas_partitions_are_seeded_and_cover_k_groups(setup):
    base, tvs, _, _ = setup
    a = lc.FunctionalMerge(base, tvs, lc.BlockScheme("atlas", 4, 3))
    b = lc.FunctionalMerge(base, tvs, lc.BlockScheme("atlas", 4, 3))
    c = lc.FunctionalMerge(base, tvs, lc.BlockScheme("atlas", 4, 4))
    k = "encoder.layer.0.attention.self.query.weight"
    assert a.parts[k].equal(b.parts[k]) and not a.parts[k].equal(c.parts[k])
    assert set(a.parts[k].unique().tolist()) == {0, 1, 2, 3}
    # one partition's coefficient moves exactly that partition's entries
    alpha = a.full_alpha(0.0)
    alpha[0, a.keys.index(k), 2] = 1.0
    d = a.delta(alpha)[k]
    sel = a.parts[k] == 2
    torch.testing.assert_close(d[sel], tvs["sent"][k][sel])
    assert d[~sel].abs().max() == 0


def test_gradients_flow_only_to_alpha(setup):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("layer"))
    before = {t: {k: v.clone() for k, v in m.state_dict().items()} for t, m in models.items()}
    r = lc.learn(fm, models, "bert", data, lc.LearnSpec(objective="ce", steps=3, lr=1e-2, init=0.3))
    assert not r.alpha.equal(fm.full_alpha(0.3))
    for t, m in models.items():  # learn() froze the task models; heads and encoders never move
        assert all(not p.requires_grad and p.grad is None for p in m.parameters())
        assert all(v.equal(before[t][k]) for k, v in m.state_dict().items())
    alpha = fm.full_alpha(0.3).requires_grad_(True)
    enc = fm.merged(alpha)
    inputs, y = data["topic"].batch(torch.arange(6), fm.device)
    out = lc.functional_logits(models["topic"], "bert", enc, inputs)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in [*fm.stacked.values(), *fm.base.values()])
    assert all(p.grad is None for p in models["topic"].parameters())


@pytest.mark.parametrize(
    "scheme,objective", [("task", "entropy"), ("layer", "ce"), ("atlas", "pseudo_label")]
)
def test_short_run_lowers_loss_and_is_deterministic(setup, scheme, objective):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme(scheme, 2, 0))
    spec = lc.LearnSpec(objective=objective, steps=12, lr=0.1, init=0.3, batch_size=18, seed=1)
    r1 = lc.learn(fm, models, "bert", data, spec)
    r2 = lc.learn(fm, models, "bert", data, dataclasses.replace(spec, steps=3))
    assert r1.losses[:3] == r2.losses
    assert sum(r1.losses[-3:]) / 3 < sum(r1.losses[:3]) / 3
    assert not r1.alpha.equal(fm.full_alpha(0.3))


def test_presets_clamp_and_select(setup):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("layer"))
    r = lc.adamerging(fm, models, "bert", data, steps=15, lr=0.2, batch_size=8)
    assert r.alpha.min() >= 0 and r.alpha.max() <= 1 and r.best_step == 15
    ref = {t: 1.0 for t in data}
    r = lc.atlas(fm, models, "bert", data, steps=6, select=data, reference=ref, eval_every=2)
    assert [h["step"] for h in r.selection] == [0, 2, 4, 6]
    best = max(r.selection, key=lambda h: h["mean_normalized"])
    assert r.best_step == best["step"]
    acc = lc.accuracies(fm, models, "bert", data, r.alpha)
    assert sum(acc.values()) / 2 == pytest.approx(best["mean_normalized"])


def test_concrete_mask_is_binary_and_tempered(setup):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    r = lc.concrete(fm, models, "bert", data, steps=3, scaling=0.5, mask_init=0.0)
    assert set(r.mask) == set(fm.keys)
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in r.mask.values())
    assert r.alpha.equal(fm.full_alpha(0.5))  # over task arithmetic: λ fixed, only the mask learns
    logits = {"w": torch.zeros(20000)}
    g = torch.Generator().manual_seed(0)
    soft = sample_mask(logits, 0.5, g)["w"]
    near_binary = float(((soft < 0.1) | (soft > 0.9)).float().mean())
    # logistic noise L: P(σ(L/T) > 0.9) = P(L > T·ln 9) = 1/(1 + 9^T) → 0.25 a side at T = 0.5
    assert 0.45 < float(soft.mean()) < 0.55 and 0.47 < near_binary < 0.53
    soft1 = sample_mask(logits, 1.0, g)["w"]
    assert 0.17 < float(((soft1 < 0.1) | (soft1 > 0.9)).float().mean()) < 0.23
    assert binary_mask({"w": torch.tensor([-1.0, 0.5])})["w"].tolist() == [0.0, 1.0]
    with pytest.raises(lc.CoefficientError, match="layer scheme"):
        lc.concrete(fm, models, "bert", data, steps=1, over="adamerging")


def test_save_and_rebuild_round_trip(setup, tmp_path):
    base, tvs, _, _ = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("atlas", 3, 5))
    alpha = torch.rand(fm.alpha_shape, generator=torch.Generator().manual_seed(0))
    mask = {k: (torch.rand(base[k].shape) > 0.3).float() for k in fm.keys}
    lc.save_learned(tmp_path / "c.safetensors", fm, alpha, mask)
    rebuilt = lc.rebuild(base, tvs, tmp_path / "c.safetensors")
    expected = fm.merged(alpha, mask)
    for k in base:
        torch.testing.assert_close(rebuilt[k], expected[k].to(base[k].dtype))
    scheme, tasks, _, a, m = lc.load_learned(tmp_path / "c.safetensors")
    assert (scheme.kind, scheme.partitions, scheme.seed, tasks) == ("atlas", 3, 5, list(tvs))
    assert a.equal(alpha) and m[fm.keys[0]].dtype == torch.bool
    with pytest.raises(lc.CoefficientError, match="non-finite"):
        lc.save_learned(tmp_path / "bad.safetensors", fm, alpha * float("nan"))


def test_heatmap_png(tmp_path):
    info = lc.heatmap_png(torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.2, 0.1]]), tmp_path / "h.png")
    data = (tmp_path / "h.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (3 * 8, 2 * 24) and info["max"] == 1.0


def test_few_shot_is_seeded_and_stratified():
    labels = [0] * 30 + [1] * 10 + [2] * 5
    a = lc.few_shot_indices(labels, 4, seed=0)
    assert a == lc.few_shot_indices(labels, 4, seed=0)
    assert a != lc.few_shot_indices(labels, 4, seed=1)
    counts = {c: sum(labels[i] == c for i in a) for c in (0, 1, 2)}
    assert counts == {0: 4, 1: 4, 2: 4} and len(set(a)) == 12
    with pytest.raises(lc.CoefficientError, match=r"k=6 .*\(2, 5\)"):
        lc.few_shot_indices(labels, 6, seed=0)
    with pytest.raises(lc.CoefficientError, match="k must be"):
        lc.few_shot_indices(labels, 0, seed=0)


def test_task_without_unlabeled_split_fails_clearly(tmp_path, tok):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "val.jsonl").write_text(json.dumps({"text": "a", "label": 0}) + "\n")
    with pytest.raises(lc.CoefficientError, match="task 't' has no 'test' split"):
        lc.load_examples(tmp_path, "t", "test", tok, 16)


def test_unknown_block_scheme_fails_clearly(setup):
    with pytest.raises(
        lc.CoefficientError, match="unknown block scheme 'rows'.*task, layer, atlas"
    ):
        lc.BlockScheme("rows")
    with pytest.raises(ConfigError, match="coefficients.learned.x.blocks.*unknown block scheme"):
        parse_params(
            {
                "tasks": ["rotten_tomatoes"],
                "coefficients": {"learned": {"x": {"method": "atlas", "blocks": "rows"}}},
            }
        )
    with pytest.raises(ValueError, match="k is required"):
        LearnedCfg(method="atlas", data="kshot")
    with pytest.raises(ValueError, match="test_unlabeled"):
        LearnedCfg(method="adamerging", data="val")


def test_divergence_stops_with_last_good_state(setup):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("layer"))
    calls = {"n": 0}

    def poison(_module, _inputs, output):  # the 3rd forward of this task (step 3) returns NaN
        calls["n"] += 1
        if calls["n"] >= 3:
            output.logits = output.logits * float("nan")
        return output

    handle = models["sent"].register_forward_hook(poison)
    seen = []
    try:
        with pytest.raises(
            lc.CoefficientDivergence, match="step 3.*last good state kept: step 2"
        ) as ei:
            lc.learn(
                fm,
                models,
                "bert",
                data,
                lc.LearnSpec(objective="entropy", steps=10, lr=0.05, init=0.3, batch_size=4),
                on_step=lambda step, loss: seen.append(step),
            )
    finally:
        handle.remove()
    assert seen == [1, 2] and ei.value.step == 2
    good = ei.value.last_good["alpha"]
    assert torch.isfinite(good).all() and not good.equal(fm.full_alpha(0.3))


def test_every_learned_method_has_a_learner():
    import typing

    from mergeflow.config import LearnedCfg
    from mergeflow.pipeline.coefficients import LEARNERS

    methods = typing.get_args(LearnedCfg.model_fields["method"].annotation)
    assert set(LEARNERS) == set(methods)
