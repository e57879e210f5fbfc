"""Fine-tuning resumes from its last resume point with bit-identical final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

from mergeflow.io import SafetensorsFile
from mergeflow.models import resume
from mergeflow.models.train import finetune
from tests.helpers import tiny_bert

TEXTS = ["good movie", "great film", "loved it", "bad movie", "awful film", "hated it", "ok"] * 3
LABELS = [1, 1, 1, 0, 0, 0, 1] * 3
KW = dict(steps=9, batch_size=4, lr=1e-3, weight_decay=0.01, warmup_ratio=0.2, max_length=16,
          device="cpu", seed=3, probe_epochs=5)


WORDS = sorted({w for t in TEXTS for w in t.split()})


def tiny_tokenizer(d: Path) -> BertTokenizerFast:
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny() -> BertForSequenceClassification:
    return tiny_bert(vocab_size=5 + len(WORDS), max_positions=32)  # dropout 0.1: exercises the RNG


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread (OpenMP spinning on a shared 2-core box costs 30x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Interrupted(Exception):
    pass


def _stop_after(k: int):
    def progress(step: int, loss: float) -> None:
        if step + 1 == k:
            raise Interrupted

    return progress


def test_interrupted_run_resumes_to_identical_weights(tok, tmp_path):
    ref = tiny()
    ref_res = finetune(ref, tok, TEXTS, LABELS, **KW)

    rd = tmp_path / ".expert.resume"
    m = tiny()
    with pytest.raises(Interrupted):  # crash after step 7: last point is step 6
        finetune(m, tok, TEXTS, LABELS, **KW, resume_dir=rd, checkpoint_every=3,
                 fingerprint="run-a", progress=_stop_after(7))
    meta = json.loads((rd / resume.META).read_text())
    assert meta["step"] == 6 and len(meta["losses"]) == 6
    st = SafetensorsFile(rd / resume.STATE)  # optimizer state as tensors, never pickled
    assert "opt.0.exp_avg" in st and "rng.torch" in st and "model.classifier.weight" in st
    assert sorted(os.listdir(tmp_path)) == [".expert.resume"]

    fresh = tiny()  # a new process would start from scratch weights
    seen: list[int] = []
    res = finetune(fresh, tok, TEXTS, LABELS, **KW, resume_dir=rd, checkpoint_every=3,
                   fingerprint="run-a", progress=lambda s, _l: seen.append(s))
    assert seen == [6, 7, 8]  # only the remaining steps ran
    assert res.losses == ref_res.losses
    assert res.probe_train_accuracy == ref_res.probe_train_accuracy
    for k, v in ref.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_point_of_another_run_is_ignored(tok, tmp_path):
    rd = tmp_path / ".expert.resume"
    with pytest.raises(Interrupted):
        finetune(tiny(), tok, TEXTS, LABELS, **KW, resume_dir=rd, checkpoint_every=2,
                 fingerprint="old-params", progress=_stop_after(3))
    seen: list[int] = []
    finetune(tiny(), tok, TEXTS, LABELS, **KW, resume_dir=rd, checkpoint_every=0,
             fingerprint="new-params", progress=lambda s, _l: seen.append(s))
    assert seen == list(range(9))


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
from test_resume import KW, TEXTS, LABELS, tiny, tiny_tokenizer
from mergeflow.io import save_state_dict
from mergeflow.models.train import finetune
tok = tiny_tokenizer(Path(sys.argv[1]) / "tok")
m = tiny()
kw = dict(KW, steps=int(sys.argv[2]))
finetune(m, tok, TEXTS, LABELS, **kw, resume_dir=sys.argv[1] + "/.e.resume",
         checkpoint_every=1, fingerprint="f",
         progress=lambda s, l: print("step", s, flush=True))
save_state_dict(m.state_dict(), sys.argv[1] + "/final.safetensors")
"""


@pytest.mark.slow
def test_sigkilled_training_process_resumes_to_identical_weights(tmp_path):
    """A real SIGKILL (no cleanup runs) at several points; each rerun continues, same result."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parents[2])))
    steps = 40
    ref_model = tiny()  # the uninterrupted reference, in-process (same seed, one thread)
    finetune(ref_model, tiny_tokenizer(tmp_path / "run" / "tok"), TEXTS, LABELS,
             **dict(KW, steps=steps))
    ref = ref_model.state_dict()

    run_dir = tmp_path / "run"
    kills = []
    for kill_at in (5, 20):  # steps printed before the kill (a point is written every step)
        p = subprocess.Popen([sys.executable, str(script), str(run_dir), str(steps)],
                             stdout=subprocess.PIPE, text=True)
        n = 0
        deadline = time.monotonic() + 300
        while n < kill_at and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            n += line.startswith("step")
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        kills.append(json.loads((run_dir / ".e.resume" / resume.META).read_text())["step"])
        assert not (run_dir / "final.safetensors").exists()
    assert kills[0] < kills[1] < steps
    subprocess.run([sys.executable, str(script), str(run_dir), str(steps)], check=True,
                   capture_output=True, timeout=300)
    got = SafetensorsFile(run_dir / "final.safetensors")
    assert set(got.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.equal(v, got.get(k)), k



def _stage_inputs(tmp: Path) -> tuple[Path, Path]:
    from transformers import BertModel

    base = tmp / "models" / "base"
    torch.manual_seed(0)
    BertModel(tiny().config).save_pretrained(base, safe_serialization=True)
    tiny_tokenizer(base).save_pretrained(base)
    data = tmp / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"label_names": ["neg", "pos"]}))
    rows = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, LABELS, strict=True))
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text(rows)
    return base, data


def test_finetune_stage_resumes_after_a_crash_and_removes_its_resume_point(tmp_path, monkeypatch):
    """The stage itself: crash after step 3, rerun, same expert bytes as an uninterrupted run."""
    from mergeflow.config import parse_params
    from mergeflow.pipeline import finetune as stage

    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    base, data = _stage_inputs(tmp_path)
    cfg = parse_params({"tasks": ["rotten_tomatoes"], "base_model": {"max_length": 16},
                        "finetune": {"steps": 5, "batch_size": 4, "probe_epochs": 3,
                                     "checkpoint_every": 2}})

    def paths(name: str) -> stage.Paths:
        return stage.Paths(task="rotten_tomatoes", data=data, base=base,
                           out=tmp_path / "experts" / name, metrics=tmp_path / f"{name}.json")

    stage.run(cfg, paths("clean"))
    real = stage.finetune

    def crashing(*a, **kw):
        def progress(step: int, loss: float) -> None:
            if step == 2:
                raise Interrupted
        return real(*a, **{**kw, "progress": progress})

    monkeypatch.setattr(stage, "finetune", crashing)
    with pytest.raises(Interrupted):
        stage.run(cfg, paths("crashed"))
    assert not (tmp_path / "experts" / "crashed").exists()
    point = stage.resume_dir(tmp_path / "experts" / "crashed")
    assert json.loads((point / resume.META).read_text())["step"] == 2
    monkeypatch.setattr(stage, "finetune", real)
    stage.run(cfg, paths("crashed"))
    assert not point.exists()
    assert sorted(os.listdir(tmp_path / "experts")) == ["clean", "crashed"]
    for f in ("model.safetensors", "expert.json"):
        a = (tmp_path / "experts" / "clean" / f).read_bytes()
        assert a == (tmp_path / "experts" / "crashed" / f).read_bytes(), f
    assert json.loads((tmp_path / "clean.json").read_text()) == json.loads(
        (tmp_path / "crashed.json").read_text())
