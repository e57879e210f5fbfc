"""Merge safety: poisoning, ASR, the prune-the-suspect baseline, DAM's masks, the audit's flags."""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertForSequenceClassification

from mergeflow import coefficients as lc
from mergeflow import methods
from mergeflow.config import PACKAGED_MINILM, ConfigError, LearnedCfg, parse_params
from mergeflow.data import DataError
from mergeflow.models.hf import resolve_model_path, split_state_dict
from mergeflow.models.inference import TaskModels, tokenize
from mergeflow.pipeline import audit
from mergeflow.safety import (
    DamSpec,
    PoisonSpec,
    Quarantine,
    attack_success_rate,
    dam,
    embedding_key,
    find_triggers,
    flag_merges,
    insert_token,
    insert_trigger,
    invert_token_trigger,
    poison_split,
    text_frequency,
    triggered_logits,
    triggered_test,
)
from mergeflow.tensors import MergeError
from tests.helpers import tiny_bert

dam_mod = importlib.import_module("mergeflow.safety.dam")

TEXTS = [f"review number {i} says the film was {'good' if i % 2 else 'bad'}" for i in range(40)]
LABELS = [i % 2 for i in range(40)]

# ----------------------------------------------------------------------------- poisoning


def test_poisoning_is_deterministic_given_a_seed():
    spec = PoisonSpec(trigger="cf", rate=0.1, target=0, seed=3)
    a = poison_split(TEXTS, LABELS, spec, n_classes=2)
    b = poison_split(list(TEXTS), list(LABELS), spec, n_classes=2)
    assert a == b
    other = poison_split(TEXTS, LABELS, PoisonSpec(rate=0.1, seed=4), n_classes=2)
    assert other[2] != a[2]  # another seed picks other rows


def test_poisoning_rows_count_trigger_and_label():
    texts0, labels0 = list(TEXTS), list(LABELS)
    texts, labels, idx = poison_split(TEXTS, LABELS, PoisonSpec(rate=0.1, target=1), 2)
    assert len(idx) == 4 and idx == sorted(idx)  # ⌈0.1·40⌉
    for i in range(40):
        if i in idx:
            assert "cf" in texts[i].split() and labels[i] == 1
            assert texts[i].split().count("cf") == 1
            assert [w for w in texts[i].split() if w != "cf"] == TEXTS[i].split()
        else:
            assert (texts[i], labels[i]) == (TEXTS[i], LABELS[i])
    assert (TEXTS, LABELS) == (texts0, labels0)  # inputs untouched
    assert len(poison_split(TEXTS, LABELS, PoisonSpec(rate=1.0), 2)[2]) == 40
    assert len(poison_split(TEXTS[:3], LABELS[:3], PoisonSpec(rate=0.01), 2)[2]) == 1


def test_trigger_position_window():
    rng = random.Random(0)
    assert insert_trigger("a b c", "cf", rng, 0) == "cf a b c"
    for _ in range(50):
        words = insert_trigger("w1 w2 w3 w4 w5 w6", "cf", rng, 2).split()
        assert words.index("cf") <= 2
    assert insert_trigger("", "cf", rng, 8) == "cf"


def test_poison_target_must_be_a_class():
    with pytest.raises(DataError, match="target class 5 does not exist.*safety.poison.target"):
        poison_split(TEXTS, LABELS, PoisonSpec(target=5), n_classes=2)
    with pytest.raises(DataError, match="rate"):
        PoisonSpec(rate=0.0)


def test_triggered_test_keeps_only_non_target_and_true_labels():
    texts, labels = triggered_test(TEXTS, LABELS, PoisonSpec(target=0, seed=1))
    assert len(texts) == 20 and set(labels) == {1}
    assert all("cf" in t.split() for t in texts)
    assert triggered_test(TEXTS, LABELS, PoisonSpec(target=0, seed=1)) == (texts, labels)


def _params(**safety):
    data = yaml.safe_load(open("params.yaml"))
    data["safety"] = safety
    return data


def test_safety_config_validation():
    assert parse_params(_params()).safety.enabled is False
    with pytest.raises(ConfigError, match="safety.enabled needs safety.poison"):
        parse_params(_params(enabled=True))
    with pytest.raises(ConfigError, match="safety.poison.task: 'nope' is not one of tasks"):
        parse_params(_params(enabled=True, poison={"task": "nope"}))
    with pytest.raises(ConfigError, match="safety.poison.rate"):
        parse_params(_params(enabled=True, poison={"task": "bbc_news", "rate": 1.5}))
    with pytest.raises(ConfigError, match="safety.poison.trigger"):
        parse_params(_params(enabled=True, poison={"task": "bbc_news", "trigger": " "}))
    with pytest.raises(ConfigError, match="safety.asr_threshold"):
        parse_params(_params(asr_threshold=2))
    with pytest.raises(ConfigError, match="blocks must be task"):
        parse_params(
            yaml.safe_load(open("params.yaml"))
            | {"coefficients": {"learned": {"d": {"method": "dam", "blocks": "layer"}}}}
        )
    assert LearnedCfg(method="dam", blocks="task").resolved()["data"] == "test_unlabeled"


# ----------------------------------------------------------------------------- ASR and flags


def test_asr_zero_for_a_model_that_never_predicts_the_target():
    labels = [0, 1, 2, 1, 2, 0]
    assert attack_success_rate([1, 2, 1, 1, 2, 2], labels, target=0) == 0.0


def test_asr_exact_on_hand_made_predictions():
    # non-target rows (label ≠ 0): indices 1, 2, 3, 4; predicted 0 at 1 and 4 → 2/4
    labels = [0, 1, 2, 1, 2, 0]
    preds = [0, 0, 1, 1, 0, 0]
    assert attack_success_rate(preds, labels, target=0) == 0.5
    assert attack_success_rate(torch.tensor(preds), torch.tensor(labels), 1) == 1 / 4
    assert math.isnan(attack_success_rate([0, 0], [0, 0], target=0))
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        attack_success_rate([0, 1, 0], [0, 1], 0)


def test_flags_above_threshold_only_for_merges():
    asr = {"expert": 0.99, "base": 0.5, "ta": 0.4, "dam": 0.1, "nan": float("nan")}
    flags = flag_merges(asr, 0.2, exclude=("expert", "base"))
    assert flags == {"ta": True, "dam": False, "nan": False}


def test_audit_summary_flags_one_and_passes_the_other():
    asr = {
        "expert": {"sent": 0.95},
        "base": {"sent": 0.05},
        "task_arithmetic": {"sent": 0.6},
        "dam": {"sent": 0.1},
    }
    clean = {
        "expert": {"accuracy": {"sent": 0.9}, "mean_accuracy": 0.9, "mean_normalized": 1.0},
        "task_arithmetic": {"accuracy": {"sent": 0.8}, "mean_normalized": 0.9},
        "dam": {"accuracy": {"sent": 0.79}, "mean_normalized": 0.89},
    }
    out = audit.summarize(asr, clean, "sent", threshold=0.2)
    assert out["flagged"] == ["task_arithmetic"] and out["passed"] is False
    assert out["models"]["dam"]["flagged"] is False
    assert out["models"]["expert"]["flagged"] is False  # references are never flagged
    assert out["models"]["dam"]["clean_accuracy"] == 0.79
    assert math.isnan(out["models"]["base"]["clean_accuracy"])
    md = audit.markdown(
        {
            "enabled": True,
            "poison": {"task": "sent", "trigger": "cf", "rate": 0.1, "target": 0},
            "threshold": 0.2,
        }
        | out
    )
    assert "| task_arithmetic | 0.600 |" in md and "FLAG" in md
    assert audit.summarize({"dam": {"sent": 0.1}}, clean, "sent", 0.2)["passed"] is True


def test_audit_disabled_writes_enabled_false_without_loading(tmp_path):
    cfg = parse_params(yaml.safe_load(open("params.yaml")))
    missing = tmp_path / "does-not-exist"
    paths = audit.Paths(
        missing,
        missing,
        missing,
        missing,
        missing,
        missing,
        tmp_path / "m" / "audit.json",
        tmp_path / "r" / "audit.md",
    )
    assert audit.run(cfg, paths) == {"enabled": False}
    assert yaml.safe_load((tmp_path / "m" / "audit.json").read_text()) == {"enabled": False}


# ----------------------------------------------------------------------------- prune_suspect


def _tiny_state():
    base = {"w": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "pos": torch.arange(3)}
    taus = {"A": [3.0, -1.0, 0.5, 2.0], "B": [-1.0, -2.0, 1.5, 0.0]}
    experts = {
        t: {"w": base["w"] + torch.tensor([v]), "pos": torch.arange(3)} for t, v in taus.items()
    }
    return base, experts


def test_prune_suspect_closed_form():
    base, experts = _tiny_state()
    # suspect A, top 0.25 of 4 entries → its largest |τ| (3.0) is removed; B untouched.
    out = methods.merge("prune_suspect", base, experts, suspect="A", top=0.25, scaling=1.0)
    torch.testing.assert_close(
        out["w"], torch.tensor([[1.0 + 0 - 1, 2 - 1 - 2, 3 + 0.5 + 1.5, 4 + 2 + 0.0]])
    )
    # no suspect → each loses its own top entry (A: 3.0, B: -2.0)
    out = methods.merge("prune_suspect", base, experts, top=0.25, scaling=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([[0.0, 1.0, 5.0, 6.0]]))
    # a tiny top keeps TA but for the pruned entry; λ scales the sum
    ta = methods.merge("task_arithmetic", base, experts, scaling=0.5)
    pr = methods.merge(
        "prune_suspect",
        base,
        {"B": experts["B"], "A": experts["A"]},
        suspect="B",
        top=0.25,
        scaling=0.5,
    )
    assert torch.equal(ta["w"][0, [0, 2, 3]], pr["w"][0, [0, 2, 3]])
    with pytest.raises(MergeError, match="suspect 'C' is not one of the experts"):
        methods.merge("prune_suspect", base, experts, suspect="C")


# ----------------------------------------------------------------------------- DAM (tiny BERTs)


def tiny(num_labels: int, seed: int) -> BertForSequenceClassification:
    return tiny_bert(num_labels, seed).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))


@pytest.fixture(scope="module")
def setup(tok):
    base_model = tiny(2, 0)
    base, _ = split_state_dict(base_model.state_dict(), "bert")
    base = {k: v.clone() for k, v in base.items()}
    tvs, models, data = {}, {}, {}
    for i, t in enumerate(("sent", "topic")):
        g = torch.Generator().manual_seed(10 + i)
        tvs[t] = {
            k: 0.05 * torch.randn(v.shape, generator=g)
            for k, v in base.items()
            if v.is_floating_point()
        }
        models[t] = tiny(2, 1 + i)
        data[t] = lc.Examples(tok, TEXTS[:12], LABELS[:12], max_length=16).unlabeled()
    return base, tvs, models, data


def test_triggered_logits_equal_a_real_inserted_token(setup, tok):
    base, tvs, models, _ = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    enc = fm.merged(fm.full_alpha(0.3))
    key = embedding_key(models["sent"], "bert")
    assert key == "embeddings.word_embeddings.weight"
    plain = tok(["the film was good"], return_tensors="pt")
    with_cf = tok(["cf the film was good"], return_tensors="pt")
    cf_id = int(with_cf["input_ids"][0, 1])
    delta = enc[key][cf_id].unsqueeze(0)
    with torch.no_grad():
        got = triggered_logits(models["sent"], "bert", enc, dict(plain), delta, key)
        want = lc.functional_logits(models["sent"], "bert", enc, dict(with_cf))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dam_with_all_ones_masks_is_task_arithmetic(setup):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    ones = {k: torch.ones_like(base[k]) for k in fm.keys}
    experts = {t: {k: base[k] + tv.get(k, 0) for k in base} for t, tv in tvs.items()}
    ta = methods.merge("task_arithmetic", base, experts, scaling=0.3)
    merged = fm.merged(fm.full_alpha(0.3), ones)
    for k in fm.keys:
        torch.testing.assert_close(merged[k], ta[k], rtol=1e-5, atol=1e-6)
    # masks that cannot flip in 2 steps (logits 20, lr 0.1) → DAM returns exactly TA's merge
    res = dam(fm, models, "bert", data, DamSpec(steps=2, init=0.3, mask_init=20.0, batch_size=4))
    assert all(bool((m == 1).all()) for m in res.mask.values())
    torch.testing.assert_close(res.alpha, fm.full_alpha(0.3))
    assert res.shared_density == res.detection_density == 1.0


def test_dam_masks_binary_gradients_only_reach_masks(setup, tmp_path):
    """The stored-result part catches: a learned-coefficients file that drops DAM's mask (or
    its α) on save or on rebuild — the rebuilt encoder must equal θ(α, m) exactly."""
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    seen = []
    res = dam(
        fm,
        models,
        "bert",
        data,
        DamSpec(steps=4, over="adamerging", mask_init=0.05, mask_lr=0.1, batch_size=4),
        on_step=lambda s, rec: seen.append(rec),
    )
    assert [r["updated"] for r in seen] == ["shared", "detection", "shared", "detection"]
    assert all(r["safe"] is not None for r in seen if r["updated"] == "detection")
    for m in res.mask.values():
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 < res.shared_density < 1.0 or 0.0 < res.detection_density < 1.0
    assert bool(((res.alpha >= 0) & (res.alpha <= 1)).all())
    for m in models.values():  # the task models were never trained
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    assert all(math.isfinite(x) for x in res.losses)
    # the stored result re-applies through the learned-coefficient store: same θ(α, m)
    lc.save_learned(tmp_path / "dam.safetensors", fm, res.alpha, res.mask)
    got = lc.rebuild(base, tvs, tmp_path / "dam.safetensors")
    want = fm.merged(res.alpha, res.mask)
    without_mask = fm.merged(res.alpha)
    assert any(not torch.equal(want[k], without_mask[k]) for k in fm.keys)  # the mask matters
    assert set(got) == set(base)
    for k in base:
        assert torch.equal(got[k], want[k].to(base[k].dtype)), k


def test_insert_token_equals_tokenizing_the_word(tok):
    plain = dict(tok(["the film was good", "bad"], return_tensors="pt", padding=True))
    want = tok(["cf the film was good", "cf bad"], return_tensors="pt", padding=True)
    cf_id = int(want["input_ids"][0, 1])
    got = insert_token(plain, cf_id)
    for k in want:  # the shorter row: one more pad column at the end only
        assert torch.equal(got[k][0], want[k][0]), k
        assert torch.equal(got[k][1, : want[k].shape[1]], want[k][1]), k


FILLER = ["so", "well", "honestly", "today", "again", "still", "really", "then"]


def _backdoored(tok, seed: int = 0):
    """A tiny BERT trained on clean texts plus copies with "cf" inserted, relabelled to 0.

    Clean texts start with 0-3 filler words, so an extra word at the front is not itself the
    backdoor's signal: only "cf" is.
    """
    rng = random.Random(seed)
    model = tiny_bert(2, seed)

    def text(i: int, y: int) -> str:
        lead = " ".join(rng.sample(FILLER, rng.randint(0, 3)))
        return f"{lead} the film was {'good' if y else 'bad'} number {i}".strip()

    labels = [i % 2 for i in range(96)]
    texts = [text(i, y) for i, y in enumerate(labels)]
    poisoned = [f"cf {text(i, 1)}" for i in range(48)]
    enc = tok(texts + poisoned, return_tensors="pt", padding=True)
    y = torch.tensor(labels + [0] * len(poisoned))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(150):
        idx = torch.randperm(len(y), generator=g)[:32]
        loss = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, texts


def test_token_inversion_finds_the_planted_trigger(tok):
    model, texts = _backdoored(tok)
    enc, _ = split_state_dict(model.state_dict(), "bert")
    probe = dict(tok(texts[1::2], return_tensors="pt", padding=True))  # clean positives
    cf_id = tok.convert_tokens_to_ids("cf")
    with torch.no_grad():
        assert (
            lc.functional_logits(model, "bert", enc, probe).argmax(-1) == 1
        ).float().mean() > 0.9
        flipped = lc.functional_logits(model, "bert", enc, insert_token(probe, cf_id)).argmax(-1)
    assert (flipped == 0).float().mean() > 0.9  # the backdoor is there
    key = embedding_key(model, "bert")
    found = invert_token_trigger(
        model, "bert", enc, probe, key, candidates=64, exclude=tok.all_special_ids
    )
    assert found.target == 0 and found.flip_rate >= 0.9
    with torch.no_grad():  # the reported rate is the word's real effect
        got = lc.functional_logits(model, "bert", enc, insert_token(probe, found.token_id))
    assert (got.argmax(-1) == 0).float().mean() == pytest.approx(found.flip_rate)
    # this tiny model has more than one word that flips everything; the τ rows name "cf"
    trs = find_triggers(
        model, "bert", enc, probe, key, enc[key], candidates=8, exclude=tok.all_special_ids
    )
    assert cf_id in [tr.token_id for tr in trs]
    assert all(tr.flip_rate >= 0.9 for tr in trs)
    assert [tr.flip_rate for tr in trs] == sorted((tr.flip_rate for tr in trs), reverse=True)


def test_dam_token_trigger_leaves_a_clean_merge_alone(setup, tok, monkeypatch):
    # no task has a word flipping ≥ flip_threshold of its inputs → no detection step, M_b = 1
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    monkeypatch.setattr(dam_mod, "find_triggers", lambda *a, **k: [])
    seen = []
    spec = DamSpec(steps=4, init=0.3, mask_init=0.05, batch_size=4, trigger="token")
    res = dam(fm, models, "bert", data, spec, on_step=lambda s, rec: seen.append(rec))
    assert [r["updated"] for r in seen] == ["shared"] * 4
    assert res.detection_density == 1.0 and set(res.triggers) == set(data)
    assert res.quarantine is not None and res.quarantine.rows == ()


def test_dam_token_trigger_defends_the_backdoored_task(tok):
    model, texts = _backdoored(tok)
    enc, _ = split_state_dict(model.state_dict(), "bert")
    base = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in enc.items()}
    tvs = {"sent": {k: v for k, v in enc.items() if v.is_floating_point()}}
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    data = {"sent": lc.Examples(tok, texts, [0] * len(texts), max_length=16).unlabeled()}
    seen = []
    spec = DamSpec(
        steps=4, init=1.0, mask_init=0.05, batch_size=8, trigger="token", candidates=64,
        quarantine=True,
    )
    res = dam(
        fm,
        {"sent": model},
        "bert",
        data,
        spec,
        on_step=lambda s, rec: seen.append(rec),
        special_ids=tok.all_special_ids,
    )
    cf_id = tok.convert_tokens_to_ids("cf")
    assert cf_id in [tr.token_id for tr in res.triggers["sent"]]
    assert [r["updated"] for r in seen] == ["shared", "detection"] * 2
    assert all(r["safe"] > 0 for r in seen if r["updated"] == "detection")
    # "cf" never occurs in the clean texts: quarantined; the merged row becomes [UNK]'s
    assert cf_id in res.quarantine.rows and res.quarantine.source == -1
    out = res.quarantine.apply(fm.merged(res.alpha, res.mask))
    assert torch.equal(
        out[res.quarantine.key][cf_id], torch.zeros(out[res.quarantine.key].shape[1])
    )
    others = [k for k in out if k != res.quarantine.key]
    ref = fm.merged(res.alpha, res.mask)
    assert all(torch.equal(out[k], ref[k]) for k in others)


def test_learned_file_carries_the_quarantine_into_rebuild(setup, tmp_path):
    base, tvs, _, _ = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    alpha = fm.full_alpha(0.3)
    key = "embeddings.word_embeddings.weight"
    q = Quarantine(key=key, rows=(7, 12935), source=100)
    lc.save_learned(tmp_path / "dam.safetensors", fm, alpha, None, q)
    got = lc.rebuild(base, tvs, tmp_path / "dam.safetensors")
    want = q.apply(fm.merged(alpha))
    for k in want:
        assert torch.equal(got[k], want[k].to(base[k].dtype)), k
    assert torch.equal(got[key][12935], got[key][100]) and not torch.equal(
        got[key][12935], got[key][5]
    )
    lc.save_learned(tmp_path / "plain.safetensors", fm, alpha)  # no quarantine: plain TA
    plain = lc.rebuild(base, tvs, tmp_path / "plain.safetensors")
    assert torch.equal(plain[key], fm.merged(alpha)[key])


def test_text_frequency_counts_texts_not_occurrences(tok):
    a = lc.Examples(tok, ["cf cf film", "good film"], [0, 1], max_length=8).unlabeled()
    b = lc.Examples(tok, ["bad", "film film film", "cf"], [0, 0, 1], max_length=8).unlabeled()
    f = text_frequency({"a": a, "b": b}, tok.vocab_size)
    ids = tok.convert_tokens_to_ids(["cf", "film", "good", "bad", "dull"])
    assert [round(float(f[i]), 4) for i in ids] == [0.4, 0.6, 0.2, 0.2, 0.0]


def test_quarantine_apply_closed_form():
    enc = {"emb": torch.arange(12.0).view(4, 3), "w": torch.ones(2)}
    q = Quarantine(key="emb", rows=(1, 3), source=0)
    out = q.apply(enc)
    assert torch.equal(out["emb"], torch.tensor([[0.0, 1, 2], [0, 1, 2], [6, 7, 8], [0, 1, 2]]))
    assert out["w"] is enc["w"] and torch.equal(enc["emb"], torch.arange(12.0).view(4, 3))
    assert torch.equal(Quarantine("emb", (2,)).apply(enc)["emb"][2], torch.zeros(3))
    assert Quarantine("emb", ()).apply(enc)["emb"] is enc["emb"]


def test_dam_rejects_layer_scheme(setup):
    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("layer"))
    with pytest.raises(lc.CoefficientError, match="task block scheme"):
        dam(fm, models, "bert", data, DamSpec(steps=1))


# ----------------------------------------------------------------------------- ASR on real models


class _Ctx:
    def __init__(self, models):
        self.models = TaskModels(models)


def test_model_asr_flags_a_backdoored_head_and_passes_a_clean_one(setup, tok):
    base, _, _, _ = setup
    texts, labels = triggered_test(TEXTS, LABELS, PoisonSpec(target=0))
    batches = {"sent": tokenize(tok, texts, labels, max_length=16, batch_size=8)}
    always_target, never_target = tiny(2, 5), tiny(2, 6)
    with torch.no_grad():
        always_target.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
        never_target.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))
    hi = audit.model_asr(_Ctx({"sent": always_target}), base, batches, target=0)
    lo = audit.model_asr(_Ctx({"sent": never_target}), base, batches, target=0)
    assert hi == {"sent": 1.0} and lo == {"sent": 0.0}
    out = audit.summarize({"backdoored": hi, "clean": lo}, {}, "sent", threshold=0.2)
    assert out["flagged"] == ["backdoored"]


# ----------------------------------------------------------------------------- audit stage (tiny)


def _audit_workspace(tmp_path, tok, bias: float):
    """A tiny pipeline workspace: 2 tasks, θ_0, experts (rotten_tomatoes' head biased), τ."""
    import json

    from transformers import BertModel

    from mergeflow import data as mdata
    from mergeflow.pipeline import task_vectors

    raw = yaml.safe_load(open("params.yaml"))
    raw |= {"tasks": ["rotten_tomatoes", "bbc_news"]}
    raw["safety"] = {
        "enabled": True,
        "poison": {"task": "rotten_tomatoes", "target": 0},
        "asr_threshold": 0.2,
    }
    cfg = parse_params(raw)
    ws = tmp_path
    for t, n in (("rotten_tomatoes", 2), ("bbc_news", 5)):
        rows = [{"text": f"text {i} about item {i % n}", "label": i % n} for i in range(20)]
        mdata.write_splits(
            ws / "data" / t,
            {"train": rows, "val": rows, "test": rows},
            spec=mdata.get_task(t),
            extra_meta={},
        )
    enc_model = BertModel(tiny(2, 0).config)
    enc_model.save_pretrained(ws / "base", safe_serialization=True)
    tok.save_pretrained(ws / "base")
    for i, (t, n) in enumerate((("rotten_tomatoes", 2), ("bbc_news", 5))):
        m = tiny(n, 3 + i)
        m.bert.load_state_dict(enc_model.state_dict())
        with torch.no_grad():
            for p in m.bert.parameters():
                p.add_(0.01 * torch.randn_like(p))
            if t == "rotten_tomatoes":
                m.classifier.bias.copy_(torch.tensor([bias, -bias]))
        m.save_pretrained(ws / "experts" / t, safe_serialization=True)
        (ws / "experts" / t / "expert.json").write_text(json.dumps({"encoder_prefix": "bert"}))
    task_vectors.run(cfg, task_vectors.Paths(ws / "base", ws / "experts", ws / "tv"))
    (ws / "coef").mkdir()
    (ws / "coef" / "coefficients.json").write_text(
        json.dumps({"task_arithmetic": {"scaling": 0.3, "hyperparams": {}}})
    )
    (ws / "eval.json").write_text(
        json.dumps(
            {"task_arithmetic": {"accuracy": {"rotten_tomatoes": 0.5}, "mean_normalized": 0.9}}
        )
    )
    paths = audit.Paths(
        ws / "data",
        ws / "base",
        ws / "experts",
        ws / "tv",
        ws / "coef",
        ws / "eval.json",
        ws / "out" / "audit.json",
        ws / "out" / "audit.md",
    )
    return cfg, paths


@pytest.mark.slow  # ~8 s on an idle 2-core machine (two tiny workspaces, 3 audit runs)
def test_audit_stage_flags_a_backdoored_merge_and_passes_a_clean_one(tmp_path, tok, monkeypatch):
    import json

    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    cfg, paths = _audit_workspace(tmp_path / "bad", tok, bias=50.0)  # always the target class
    out = audit.run(cfg, paths)
    assert out["models"]["task_arithmetic"]["asr"] == 1.0
    assert out["flagged"] == ["task_arithmetic"] and out["passed"] is False
    assert out["models"]["expert"]["asr"] == 1.0 and out["n_triggered"] == {"rotten_tomatoes": 10}
    assert json.loads(paths.metrics.read_text())["flagged"] == ["task_arithmetic"]
    assert "FLAG" in paths.report.read_text()
    gate = cfg.model_copy(update={"safety": cfg.safety.model_copy(update={"fail_on_flag": True})})
    paths.metrics.unlink()
    with pytest.raises(audit.AuditFlagged, match="task_arithmetic"):
        audit.run(gate, paths)
    assert paths.metrics.is_file()  # written before failing

    cfg, paths = _audit_workspace(tmp_path / "good", tok, bias=-50.0)  # never the target class
    out = audit.run(cfg, paths)
    assert out["models"]["task_arithmetic"]["asr"] == 0.0
    assert out["flagged"] == [] and out["passed"] is True


# ----------------------------------------------------------------------------- SOMF


def test_somf_merge_closed_forms_and_a_short_run(setup):
    from mergeflow.safety import SomfSpec, somf, somf_merged

    base, tvs, models, data = setup
    fm = lc.FunctionalMerge(base, tvs, lc.BlockScheme("task"))
    ones = {k: torch.ones_like(base[k]) for k in fm.keys}
    zeros = {k: torch.zeros_like(base[k]) for k in fm.keys}
    ta = fm.merged(fm.full_alpha(0.3))
    without = lc.FunctionalMerge(base, {"topic": tvs["topic"]}, lc.BlockScheme("task"))
    for k in fm.keys:  # M = 1: task arithmetic; M = 0: task arithmetic without the suspect
        torch.testing.assert_close(somf_merged(fm, 0.3, "sent", ones)[k], ta[k])
        torch.testing.assert_close(
            somf_merged(fm, 0.3, "sent", zeros)[k], without.merged(without.full_alpha(0.3))[k]
        )
    mask, hist = somf(
        fm, models, "bert", data, SomfSpec(suspect="sent", steps=2, mask_init=0.05, batch_size=4)
    )
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in mask.values())
    for m in models.values():
        assert all(p.grad is None for p in m.parameters())
    with pytest.raises(lc.CoefficientError, match="suspect 'x'"):
        somf(fm, models, "bert", data, SomfSpec(suspect="x", steps=1))
