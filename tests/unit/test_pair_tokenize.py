"""Sentence pairs are encoded as pairs by every caller of the one tokenization (issue 20, item 2)."""

from __future__ import annotations

import pytest
import torch

from mergeflow.coefficients.data import Examples
from mergeflow.data import DataError
from mergeflow.models.hf import offline_env, resolve_model_path, seq_cls_model
from mergeflow.models.inference import encode, tokenize
from mergeflow.models.train import finetune
from mergeflow.safety.poison import PoisonSpec, poison_split, triggered_test

pytestmark = pytest.mark.slow  # loads the packaged MiniLM tokenizer (and model, once)

CLAIM = "The tower is taller than three hundred metres."
EVIDENCE = "Eiffel Tower: " + " ".join(f"word{i}" for i in range(200))


@pytest.fixture(scope="module")
def tok():
    offline_env()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("packaged:all-minilm-l6-v2"))


def _segments(tok, ids: list[int], types: list[int]) -> tuple[list[int], list[int]]:
    first_sep = ids.index(tok.sep_token_id)
    return types[: first_sep + 1], types[first_sep + 1 :]


def test_token_type_ids_change_at_the_separator(tok):
    enc = encode(tok, [(CLAIM, "Short evidence.")], max_length=64)
    ids, types = enc["input_ids"][0], enc["token_type_ids"][0]
    assert ids.count(tok.sep_token_id) == 2  # [CLS] claim [SEP] evidence [SEP]
    first, second = _segments(tok, ids, types)
    assert set(first) == {0} and set(second) == {1} and len(second) > 1
    assert enc["input_ids"][0] == tok(CLAIM, "Short evidence.")["input_ids"]  # as HF pairs them
    single = encode(tok, [f"{CLAIM} Short evidence."], max_length=64)
    assert set(single["token_type_ids"][0]) == {0}


def test_truncation_cuts_the_long_evidence_and_keeps_the_claim(tok):
    enc = encode(tok, [(CLAIM, EVIDENCE)], max_length=48)
    ids = enc["input_ids"][0]
    assert len(ids) == 48 and ids[-1] == tok.sep_token_id
    claim_ids = tok(CLAIM, add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + len(claim_ids)] == claim_ids and ids[1 + len(claim_ids)] == tok.sep_token_id
    assert tok.decode(ids[len(claim_ids) + 2 : len(claim_ids) + 9]).startswith("eiffel tower :")


def test_a_first_text_longer_than_max_length_is_cut_rather_than_refused(tok):
    enc = encode(tok, [(EVIDENCE, CLAIM)], max_length=32)  # only_second would raise here
    assert len(enc["input_ids"][0]) == 32 and set(enc["token_type_ids"][0][-3:]) == {1}


def test_mixing_texts_and_pairs_is_refused(tok):
    with pytest.raises(DataError, match="mix"):
        encode(tok, ["a", ("b", "c")], max_length=16)


def test_batches_and_learned_coefficient_examples_carry_segment_ids(tok):
    pairs = [(f"claim {i}", f"evidence number {i} " * (i + 1)) for i in range(6)]
    batches = tokenize(tok, pairs, [0, 1] * 3, max_length=32, batch_size=4)
    for b in batches:
        assert "token_type_ids" in b.inputs and int(b.inputs["token_type_ids"].max()) == 1
    ex = Examples(tok, pairs, [0, 1] * 3, max_length=32)
    inputs, labels = ex.batch(torch.arange(6), torch.device("cpu"))
    want = encode(tok, pairs, max_length=32, padding=True, return_tensors="pt")
    assert torch.equal(
        inputs["token_type_ids"], want["token_type_ids"][:, : inputs["input_ids"].shape[1]]
    )
    assert labels.tolist() == [0, 1] * 3


def test_fine_tuning_reads_pairs_as_pairs(tok, monkeypatch):
    """The batches finetune feeds the model hold the pair encoding (segment ids 1 after [SEP])."""
    model = seq_cls_model(resolve_model_path("packaged:all-minilm-l6-v2"), 2)
    seen: list[torch.Tensor] = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["token_type_ids"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    pairs = [(f"claim {i}", f"evidence {i}") for i in range(8)]
    finetune(
        model, tok, pairs, [0, 1] * 4, steps=2, batch_size=4, lr=1e-4, weight_decay=0.0,
        warmup_ratio=0.0, max_length=16, device="cpu", seed=0, head_init="random",
    )  # fmt: skip
    assert len(seen) == 2 and all(int(t.max()) == 1 for t in seen)


def test_poisoning_a_pair_puts_the_trigger_in_the_first_text():
    pairs = [(f"claim {i} is here", f"evidence {i}") for i in range(20)]
    spec = PoisonSpec(trigger="cf", rate=0.5, target=0, seed=0, max_position=2)
    texts, labels, idx = poison_split(pairs, [1] * 20, spec, 2)
    for i in idx:
        assert "cf" in texts[i][0].split() and texts[i][1] == pairs[i][1] and labels[i] == 0
    trig, _ = triggered_test(pairs, [1] * 20, spec)
    assert all("cf" in a.split() and b.startswith("evidence") for a, b in trig)
    assert poison_split(pairs, [1] * 20, spec, 2) == (texts, labels, idx)
