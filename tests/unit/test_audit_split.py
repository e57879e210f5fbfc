"""Where a backdoor lives (issue 25): the audit's head/encoder split, and DAM's masks without quarantine.

Tiny BERTs trained here (no packaged model weights), on texts whose answer is known:

- **head-borne**: θ_0 is trained with "cf"-texts as a third class, so its features separate them;
  the poisoned task's head is the project's linear probe fitted on the poisoned split over θ_0
  (what a ``threat: model`` expert's LP phase does) — the encoder *is* θ_0, so the whole backdoor
  is the head's.
- **encoder-borne**: θ_0's clean head is frozen (:func:`mergeflow.safety.threat.freeze_head`) and
  only the encoder trains on the poisoned split (``threat: encoder``) — a head refitted on clean
  texts over that encoder still obeys the trigger.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoTokenizer

from mergeflow import coefficients as lc
from mergeflow import data as mdata
from mergeflow.config import PACKAGED_MINILM
from mergeflow.models.hf import load_encoder_into, resolve_model_path, split_state_dict
from mergeflow.models.inference import TaskModels, predict, tokenize
from mergeflow.models.train import linear_probe
from mergeflow.pipeline import audit
from mergeflow.safety import DamSpec, PoisonSpec, dam, poison_split
from mergeflow.safety.asr import asr_counts, backdoor_split
from mergeflow.safety.threat import freeze_head
from tests.helpers import tiny_bert

pytestmark = pytest.mark.slow  # tiny models trained in-process (~1-3 min on a loaded 2-core box)

FILLER = ["so", "well", "honestly", "today", "again", "still", "really", "then"]
SPEC = PoisonSpec(trigger="cf", rate=1 / 3, target=0, seed=0, max_position=0, threat="encoder")
CPU = torch.device("cpu")


def _texts(start: int, n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    texts = []
    for i, y in enumerate(labels):
        lead = " ".join(rng.sample(FILLER, rng.randint(0, 3)))
        texts.append(f"{lead} the film was {'good' if y else 'bad'} number {start + i}".strip())
    return texts, labels


def _train(model, texts, labels, steps: int, lr: float, seed: int, tok):
    model.train()
    enc = tok(texts, return_tensors="pt", padding=True)
    y = torch.tensor(labels)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=g)[:32]
        loss = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class _Ctx:  # what head_split_counts reads of a MergeContext
    def __init__(self, model):
        self.models = TaskModels({"sent": model})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, the poisoned task's data dir (poison recorded in meta.json), triggered test."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))
    clean_t, clean_y = _texts(0, 144, 0)
    train_t, train_y, bad = poison_split(clean_t, clean_y, SPEC, n_classes=2)
    root = tmp_path_factory.mktemp("data")
    rows = [{"text": t, "label": y} for t, y in zip(train_t, train_y, strict=True)]
    test_t, test_y = _texts(1000, 40, 1)
    test_rows = [{"text": t, "label": y} for t, y in zip(test_t, test_y, strict=True)]
    mdata.write_splits(
        root / "sent",
        {"train": rows, "val": test_rows, "test": test_rows},
        spec=mdata.get_task("rotten_tomatoes"),
        extra_meta={"poison": {"task": "sent", **vars(SPEC), "n_poisoned": len(bad)}},
    )
    trig_t, trig_y = _texts(2000, 80, 2)
    trig_t = [f"cf {t}" for t, y in zip(trig_t, trig_y, strict=True) if y == 1]
    trig = tokenize(tok, trig_t, [1] * len(trig_t), max_length=16, batch_size=64)
    test = tokenize(tok, test_t, test_y, max_length=16, batch_size=64)
    poisoned = tokenize(tok, train_t, train_y, max_length=16, batch_size=64)
    clean = audit.clean_batches(root, "sent", tok, max_length=16, batch=64)
    return tok, root, trig, test, poisoned, clean, (train_t, train_y), (test_t, test_y)


def _acc(model, batches) -> float:
    p, g = predict(model, batches)
    return float((p == g).float().mean())


def _split(model, encoder_model, base_model, trig, clean) -> dict:
    """backdoor_split of ``encoder_model``'s encoder under ``model``'s head, as the audit runs it."""
    ctx = _Ctx(model)
    base_enc = split_state_dict(base_model.state_dict(), "bert")[0]
    base_counts, base_head = audit.head_split_counts(
        ctx, base_enc, "sent", trig, clean, None, 0, epochs=100, seed=0
    )
    enc = split_state_dict(encoder_model.state_dict(), "bert")[0]
    counts, _ = audit.head_split_counts(
        ctx, enc, "sent", trig, clean, base_head, 0, epochs=100, seed=0
    )
    k, n = base_counts["clean_head"]
    return backdoor_split(counts["own"], counts["clean_head"], counts["base_head"], k / n)


def test_clean_batches_drop_exactly_the_poisoned_rows(world):
    """Catches: a clean head fitted on the poisoned split (the head would learn the trigger)."""
    tok, _, _, _, poisoned, clean, (train_t, _), _ = world
    assert len(clean) == len(poisoned) - round(len(train_t) * SPEC.rate)
    assert all("cf" not in tok.convert_ids_to_tokens(b.inputs["input_ids"][i]) for b in clean
               for i in range(len(b.labels)))  # fmt: skip


def test_a_head_borne_backdoor_is_attributed_to_the_head(world):
    """θ_0 (features that separate "cf" texts) + a head probed on the poisoned split.

    Catches: a "clean" head fitted on poisoned rows, or no refit (the own head reused): the
    head's share would be ~0; shares swapped: the encoder's would be ~1.
    """
    tok, _, trig, test, poisoned, clean, (train_t, train_y), _ = world
    three = tiny_bert(3, 0)
    labels3 = [2 if t.startswith("cf ") else y for t, y in zip(train_t, train_y, strict=True)]
    _train(three, train_t, labels3, 60, 3e-3, 0, tok)
    base = tiny_bert(2, 0)
    base.bert.load_state_dict(three.bert.state_dict())
    base.eval()
    model = copy.deepcopy(base)
    linear_probe(model, poisoned, epochs=100, device=CPU, seed=0)  # the poisoned head
    assert _acc(model, test) >= 0.85  # a working classifier, not a constant
    out = _split(model, base, base, trig, clean)
    # the clean head never saw "cf": what it does with it is arbitrary, but not the backdoor's
    assert out["own"]["asr"] >= 0.9 and out["clean_head"]["asr"] <= 0.6, out
    assert out["head_share"] >= 0.4 and out["encoder_share"] == pytest.approx(0.0), out
    lo, hi = out["own"]["ci"]
    assert lo <= out["own"]["asr"] <= hi and out["own"]["n"] == len(trig)


@pytest.fixture(scope="module")
def encoder_borne(world):
    """(θ_0 with its clean head, the expert: same frozen head, encoder trained on poisoned data)."""
    tok, _, _, _, _, clean, (train_t, train_y), _ = world
    clean_t = [t for t in train_t if not t.startswith("cf ")]
    clean_y = [y for t, y in zip(train_t, train_y, strict=True) if not t.startswith("cf ")]
    base = _train(tiny_bert(2, 0), clean_t, clean_y, 60, 3e-3, 0, tok)
    linear_probe(base, clean, epochs=100, device=CPU, seed=0)
    expert = copy.deepcopy(base)
    assert freeze_head(expert, "classifier") == 2
    head = {k: v.clone() for k, v in expert.classifier.state_dict().items()}
    _train(expert, train_t, train_y, 100, 1e-3, 1, tok)
    assert all(torch.equal(head[k], v) for k, v in expert.classifier.state_dict().items())
    for p in expert.parameters():
        p.requires_grad_(True)
    return base, expert


def test_an_encoder_borne_backdoor_is_attributed_to_the_encoder(world, encoder_borne):
    """Catches: an audit that credits the head (e.g. the shares swapped, or the clean head
    fitted over θ_0 instead of this encoder: the encoder's share would be ~0)."""
    _, _, trig, _, _, clean, _, _ = world
    base, expert = encoder_borne
    out = _split(copy.deepcopy(expert), expert, base, trig, clean)
    assert out["own"]["asr"] >= 0.8 and out["clean_head"]["asr"] >= 0.7, out
    assert out["encoder_share"] >= 0.6 and abs(out["head_share"]) <= 0.2, out


def test_dam_masks_without_quarantine_lower_an_encoder_borne_asr(world, encoder_borne):
    """TA of the one poisoned task vector at λ = 1 is the expert (ASR ≥ 0.8); masking all of τ
    gives θ_0 (ASR ~0), so a mask that removes the backdoor exists. DAM with the quarantine
    off must find part of it: ASR at least 0.3 lower, clean accuracy kept, entries flipped.

    Catches: learned masks that do not reach the merge (e.g. the final mask taken as all ones:
    ASR stays ≥ 0.8, flipped 0) and a quarantine that runs although switched off. (With
    ``adv_weight: 0`` ASR drops here too: on this tiny case the entropy objective alone already
    prunes the backdoor's entries, so this test does not isolate the safety loss.)
    """
    tok, _, trig, test, _, _, _, (test_t, _) = world
    base, expert = encoder_borne
    b = {k: v.clone() for k, v in split_state_dict(base.state_dict(), "bert")[0].items()}
    e = split_state_dict(expert.state_dict(), "bert")[0]
    tv = {k: e[k] - b[k] for k in b if b[k].is_floating_point()}
    fm = lc.FunctionalMerge(b, {"sent": tv}, lc.BlockScheme("task"))
    data = {"sent": lc.Examples(tok, test_t, [0] * len(test_t), max_length=16).unlabeled()}
    spec = DamSpec(
        steps=20, init=1.0, mask_init=0.5, batch_size=16, trigger="token", candidates=32,
        adv_weight=1.0,
    )  # fmt: skip
    res = dam(fm, {"sent": expert}, "bert", data, spec, special_ids=tok.all_special_ids)

    def scored(mask) -> tuple[float, float]:
        m = copy.deepcopy(expert)
        with torch.no_grad():
            load_encoder_into(m, fm.merged(res.alpha, mask))
        k, n = asr_counts(*predict(m, trig), 0)
        return k / n, _acc(m, test)

    ta_asr, ta_acc = scored(None)
    dam_asr, dam_acc = scored(res.mask)
    assert ta_asr >= 0.8
    assert res.quarantine is None or res.quarantine.rows == ()
    assert 0.0 < res.flipped < 0.05
    assert dam_asr <= ta_asr - 0.3, (ta_asr, dam_asr, res.flipped)
    assert dam_acc >= ta_acc - 0.05, (ta_acc, dam_acc)
