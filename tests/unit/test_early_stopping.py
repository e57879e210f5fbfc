"""Early stopping on validation: the stopping step, the kept (best) weights, resume, config."""

from __future__ import annotations

import pytest
import torch

import mergeflow.models.train as train
from mergeflow.config import ConfigError, FinetuneCfg
from mergeflow.models.inference import tokenize
from mergeflow.models.train import finetune
from tests.unit import test_resume
from tests.unit.test_resume import KW, LABELS, TEXTS, Interrupted, tiny

tok = test_resume.tok  # the same fixtures: tiny tokenizer, one torch thread
_one_thread = test_resume._one_thread


def _scripted(monkeypatch, scores: list[float]) -> list[int]:
    """Validation scores in the given order (the training itself is real); returns call steps."""
    calls: list[int] = []

    def fake(model, batches, device):
        calls.append(len(calls))
        return scores[len(calls) - 1]

    monkeypatch.setattr(train, "accuracy", fake)
    return calls


def _snapshots():
    """progress callback that keeps the weights after every step (step index -> state dict)."""
    kept: dict[int, dict[str, torch.Tensor]] = {}
    holder: dict = {}

    def progress(step: int, _loss: float) -> None:
        kept[step + 1] = {k: v.detach().clone() for k, v in holder["m"].state_dict().items()}

    return kept, holder, progress


def test_stops_after_patience_and_keeps_the_best_weights(tok, monkeypatch):
    # eval_every 2 -> scores at steps 2, 4, 6, 8; best at 4, then two without improvement:
    # with patience 2 training ends after step 8 of 9 and the weights of step 4 are kept
    calls = _scripted(monkeypatch, [0.5, 0.7, 0.6, 0.7, 0.9])
    kept, holder, progress = _snapshots()
    m = tiny()
    holder["m"] = m
    val = tokenize(tok, TEXTS[:6], LABELS[:6], max_length=16, batch_size=4)
    res = finetune(m, tok, TEXTS, LABELS, **KW, val_batches=val, eval_every=2, patience=2,
                   progress=progress)  # fmt: skip
    assert res.val_history == [(2, 0.5), (4, 0.7), (6, 0.6), (8, 0.7)]  # equal is no improvement
    assert len(calls) == 4 and res.best_step == 4 and res.steps_run == 8
    assert len(res.losses) == 8
    for k, v in m.state_dict().items():
        assert torch.equal(v, kept[4][k]), k
    assert not all(torch.equal(v, kept[8][k]) for k, v in m.state_dict().items())


def test_without_patience_runs_all_steps_and_scores_the_last(tok, monkeypatch):
    _scripted(monkeypatch, [0.5, 0.6, 0.6, 0.6, 0.8])
    kept, holder, progress = _snapshots()
    m = tiny()
    holder["m"] = m
    val = tokenize(tok, TEXTS[:6], LABELS[:6], max_length=16, batch_size=4)
    res = finetune(m, tok, TEXTS, LABELS, **KW, val_batches=val, eval_every=2, progress=progress)
    assert [s for s, _ in res.val_history] == [2, 4, 6, 8, 9]  # the final step is always scored
    assert res.best_step == 9 and res.steps_run == 9
    for k, v in m.state_dict().items():
        assert torch.equal(v, kept[9][k]), k


def test_interrupted_early_stopping_run_resumes_to_the_same_result(tok, monkeypatch, tmp_path):
    scores = [0.5, 0.8, 0.6, 0.7, 0.9]
    val = tokenize(tok, TEXTS[:6], LABELS[:6], max_length=16, batch_size=4)
    es = dict(val_batches=val, eval_every=2, patience=2)
    _scripted(monkeypatch, scores)
    ref = tiny()
    ref_res = finetune(ref, tok, TEXTS, LABELS, **KW, **es)

    rd = tmp_path / ".e.resume"
    _scripted(monkeypatch, scores)

    def stop_after_7(step: int, _loss: float) -> None:
        if step + 1 == 7:
            raise Interrupted

    with pytest.raises(Interrupted):  # resume point at step 6 holds the best (step 4) weights
        finetune(tiny(), tok, TEXTS, LABELS, **KW, **es, resume_dir=rd, checkpoint_every=3,
                 fingerprint="f", progress=stop_after_7)  # fmt: skip
    _scripted(monkeypatch, scores[3:])  # the scores of steps 2, 4, 6 are in the point
    fresh = tiny()
    res = finetune(fresh, tok, TEXTS, LABELS, **KW, **es, resume_dir=rd, checkpoint_every=3,
                   fingerprint="f")  # fmt: skip
    assert res.val_history == ref_res.val_history and res.best_step == ref_res.best_step == 4
    assert res.steps_run == ref_res.steps_run == 8
    for k, v in ref.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_config_needs_eval_every_for_patience():
    with pytest.raises((ConfigError, ValueError), match="patience > 0 needs eval_every"):
        FinetuneCfg(patience=3)
    assert FinetuneCfg(eval_every=10, patience=3).patience == 3


def test_eval_every_needs_validation_batches(tok):
    with pytest.raises(ValueError, match="needs val_batches"):
        finetune(tiny(), tok, TEXTS, LABELS, **KW, eval_every=2)
