"""Bad inputs, one row each: the CLI, params.yaml, checkpoints, LoRA adapters and data.

Every row must end in ONE clear message naming what to fix (asserted on a substring naming the
key / file / tensor), a non-zero exit (CLI rows) or the specific exception type (library rows),
and no output left behind: the row's output path does not exist afterwards and its parent holds
no temp files. Rows marked ``proc`` run the real entry points (``mergeflow``, ``stages/*.py``) in
a subprocess to prove the exit status; the rest run in-process (``typer.testing.CliRunner`` or a
direct call) to stay fast. ``docs/reliability.md`` lists these rows with the observed messages.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergeflow.data import DataError
from mergeflow.io import CheckpointError, SafetensorsFile
from mergeflow.tensors import MergeError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

CONFIG = {
    "model_type": "bert",
    "hidden_size": 4,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "intermediate_size": 8,
    "vocab_size": 10,
}


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.w": torch.randn(4, 3, generator=g),
        "enc.b": torch.randn(4, generator=g),
        "ids": torch.arange(4, dtype=torch.int64),
    }


def _ckpt(d: Path, sd: dict[str, torch.Tensor] | None = None, **config: Any) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(sd if sd is not None else _sd(), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**CONFIG, **config}))
    return d


def _raw_safetensors(path: Path, header: object, data: bytes = b"", n: int | None = None) -> Path:
    """A hand-crafted safetensors file: 8-byte length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _f32(shape: list[int], begin: int) -> dict:
    n = 4
    for s in shape:
        n *= s
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


@dataclass
class Row:
    """One bad input.

    ``kind``: ``merge`` (``mergeflow merge`` via CliRunner, args from ``setup``), ``cli``
    (another ``mergeflow`` command via CliRunner), ``proc`` (argv run as a subprocess),
    ``call`` (``setup`` returns a callable that must raise ``exc``).
    """

    id: str
    kind: str
    setup: Callable[[Path], Any]
    expect: str
    exc: type[BaseException] | None = None
    marks: list = field(default_factory=list)


# ---------------------------------------------------------------- mergeflow merge (in-process)


def merge_args(tmp: Path, *, base: Path | None = None, experts: dict | None = None) -> list[str]:
    base = base or _ckpt(tmp / "base")
    if experts is None:
        experts = {"a": _ckpt(tmp / "ex_a", _sd(1)), "b": _ckpt(tmp / "ex_b", _sd(2))}
    args = ["merge", "--method", "task_arithmetic", "--base", str(base), "--no-progress"]
    for t, p in experts.items():
        args += ["--expert", f"{t}={p}"]
    return [*args, "--out", str(tmp / "out" / "merged")]


def _expert_with(tmp: Path, edit: Callable[[dict], None], **config: Any) -> list[str]:
    sd = _sd(1)
    edit(sd)
    return merge_args(tmp, experts={"a": _ckpt(tmp / "ex_a", sd, **config)})


def _setitem(k: str, v: torch.Tensor) -> Callable[[dict], None]:
    return lambda sd: sd.__setitem__(k, v)


def _truncated_expert(tmp: Path) -> list[str]:
    d = _ckpt(tmp / "ex_a", _sd(1))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    return merge_args(tmp, experts={"a": d})


def _pickled_expert(tmp: Path) -> list[str]:
    d = tmp / "ex_a"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")  # never unpickled
    return merge_args(tmp, experts={"a": d})


def _crafted_expert(tmp: Path, header: dict, data: bytes, n: int | None = None) -> list[str]:
    d = tmp / "ex_a"
    _raw_safetensors(d / "model.safetensors", header, data, n)
    return merge_args(tmp, experts={"a": d})


def _missing_shard(tmp: Path) -> list[str]:
    d = _ckpt(tmp / "ex_a", _sd(1))
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in ("enc.w", "ids")}
    wm["enc.b"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return merge_args(tmp, experts={"a": d})


def _out_is_parent_of_base(tmp: Path) -> list[str]:
    args = merge_args(tmp, base=_ckpt(tmp / "models" / "base"))
    args[-1] = str(tmp / "models")  # replacing it would delete the base
    return args


MERGE_ROWS = [
    Row(
        "merge-architecture-mismatch",
        "merge",
        lambda t: _expert_with(t, lambda sd: None, hidden_size=8),
        "hidden_size=8",
    ),
    Row(
        "merge-shape-mismatch",
        "merge",
        lambda t: _expert_with(t, _setitem("enc.w", torch.zeros(3, 4))),
        "'enc.w' has shape",
    ),
    Row(
        "merge-dtype-mismatch",
        "merge",
        lambda t: _expert_with(t, _setitem("enc.b", torch.zeros(4, dtype=torch.int32))),
        "'enc.b' has dtype torch.int32",
    ),
    Row(
        "merge-nan-in-expert",
        "merge",
        lambda t: _expert_with(t, _setitem("enc.b", torch.tensor([0.0, float("nan"), 1, 2]))),
        "tensor 'enc.b' contains non-finite values (1 NaN",
    ),
    Row(
        "merge-inf-in-base",
        "merge",
        lambda t: merge_args(
            t, base=_ckpt(t / "base", {**_sd(), "enc.b": torch.full((4,), float("inf"))})
        ),
        "base",
    ),
    Row(
        "merge-missing-tensor",
        "merge",
        lambda t: _expert_with(t, lambda sd: sd.pop("enc.b")),
        "missing tensor 'enc.b'",
    ),
    Row(
        "merge-extra-tensor",
        "merge",
        lambda t: _expert_with(t, _setitem("head.w", torch.zeros(2))),
        "has tensor 'head.w' that the base lacks",
    ),
    Row(
        "merge-unknown-method",
        "merge",
        lambda t: [*merge_args(t), "--method", "averagez"],
        "unknown method 'averagez'; available: breadcrumbs",
    ),
    Row(
        "merge-unknown-hyperparameter",
        "merge",
        lambda t: [*merge_args(t), "--set", "scalng=0.3"],
        "scalng",
    ),
    Row(
        "merge-out-of-range-density",
        "merge",
        lambda t: [*merge_args(t), "--method", "ties", "--set", "density=1.5"],
        "density",
    ),
    Row("merge-no-experts", "merge", lambda t: merge_args(t, experts={}), "no experts given"),
    Row(
        "merge-duplicate-expert",
        "merge",
        lambda t: [*merge_args(t), "--expert", f"a={t / 'ex_b'}"],
        "task 'a' given twice",
    ),
    Row(
        "merge-path-traversal-task-name",
        "merge",
        lambda t: merge_args(t, experts={"../x": _ckpt(t / "ex_a", _sd(1))}),
        "task name '../x' is not allowed",
    ),
    Row("merge-out-contains-inputs", "merge", _out_is_parent_of_base, "would replace the base"),
    Row("merge-truncated-expert", "merge", _truncated_expert, "truncated or corrupted"),
    Row(
        "merge-pickled-expert",
        "merge",
        _pickled_expert,
        "pytorch_model.bin: pickled checkpoints are refused",
    ),
    Row(
        "merge-oversized-header",
        "merge",
        lambda t: _crafted_expert(t, {}, b"", n=200 * 1024**2),
        "exceeds the 104857600 bytes",
    ),
    Row(
        "merge-overlapping-offsets",
        "merge",
        lambda t: _crafted_expert(
            t,
            {
                "enc.w": _f32([4, 3], 0),
                "enc.b": _f32([4], 32),
                "ids": {"dtype": "I64", "shape": [4], "data_offsets": [48, 80]},
            },
            b"\0" * 80,
        ),
        "'enc.w' and 'enc.b' have overlapping data_offsets",
    ),
    Row(
        "merge-index-names-missing-shard",
        "merge",
        _missing_shard,
        "names shard 'model-00002-of-00002.safetensors', which is missing",
    ),
    Row(
        "merge-storage-options-not-json",
        "merge",
        lambda t: [*merge_args(t), "--storage-options", "{endpoint: x"],
        "--storage-options is not JSON",
    ),
]

# ---------------------------------------------------------- crafted safetensors (direct reads)


def _read(path: Path) -> Callable[[], Any]:
    return lambda: SafetensorsFile(path)


ST = "m.safetensors"
SAFETENSORS_ROWS = [
    Row(
        "st-offsets-beyond-eof",
        "call",
        lambda t: _read(_raw_safetensors(t / ST, {"w": _f32([100], 0)}, b"\0" * 16)),
        "'w' has offsets outside the file",
        CheckpointError,
    ),
    Row(
        "st-shape-offset-mismatch",
        "call",
        lambda t: _read(
            _raw_safetensors(
                t / ST, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16
            )
        ),
        "not matching its shape",
        CheckpointError,
    ),
    Row(
        "st-bad-json",
        "call",
        lambda t: _read(_raw_safetensors(t / ST, b"{'w': 1", b"")),
        "header is not valid JSON",
        CheckpointError,
    ),
    Row(
        "st-header-not-object",
        "call",
        lambda t: _read(_raw_safetensors(t / ST, [1, 2])),
        "header is not a JSON object",
        CheckpointError,
    ),
    Row(
        "st-header-longer-than-file",
        "call",
        lambda t: _read(_raw_safetensors(t / ST, {}, b"", n=4096)),
        "header length 4096 is larger than the file",
        CheckpointError,
    ),
    Row(
        "st-shorter-than-8-bytes",
        "call",
        lambda t: (t / ST).write_bytes(b"\x01\x02") and _read(t / ST),
        "shorter than a safetensors header",
        CheckpointError,
    ),
    Row(
        "st-unknown-dtype",
        "call",
        lambda t: _read(
            _raw_safetensors(
                t / ST, {"w": {"dtype": "F8_E4M3X", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
            )
        ),
        "'w' has unsupported dtype 'F8_E4M3X'",
        CheckpointError,
    ),
    Row(
        "st-negative-dimension",
        "call",
        lambda t: _read(
            _raw_safetensors(
                t / ST,
                {"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},
                b"\0" * 8,
            )
        ),
        "'w' has a negative dimension",
        CheckpointError,
    ),
    Row(
        "st-duplicate-tensor-name",
        "call",
        lambda t: _read(
            _raw_safetensors(
                t / ST,
                b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                b'"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
                b"\0\0",
            )
        ),
        "names tensor 'w' twice",
        CheckpointError,
    ),
    Row(
        "st-metadata-not-strings",
        "call",
        lambda t: _read(_raw_safetensors(t / ST, {"__metadata__": {"k": 1}})),
        "__metadata__ must map strings to strings",
        CheckpointError,
    ),
    Row(
        "st-pickle-suffix",
        "call",
        lambda t: (t / "model.ckpt").write_bytes(b"\x80\x04") and _read(t / "model.ckpt"),
        "safetensors.torch.save_file",
        CheckpointError,
    ),
]

# ------------------------------------------------------------------------------ params.yaml

MINIMAL = {"tasks": ["rotten_tomatoes", "bbc_news"]}


def _params(tmp: Path, edit: dict | str) -> list[str]:
    p = tmp / "params.yaml"
    if isinstance(edit, str):
        p.write_text(edit)
    else:
        from mergeflow.config import deep_merge

        p.write_text(yaml.safe_dump(deep_merge(MINIMAL, edit)))
    return ["check-params", str(p)]


PARAMS_ROWS = [
    Row(
        "params-empty-task-list",
        "cli",
        lambda t: _params(t, {"tasks": []}),
        "tasks: Value error, the task list is empty",
    ),
    Row(
        "params-duplicate-tasks",
        "cli",
        lambda t: _params(t, {"tasks": ["bbc_news", "bbc_news"]}),
        "duplicate task(s): bbc_news",
    ),
    Row(
        "params-path-traversal-task",
        "cli",
        lambda t: _params(t, {"tasks": ["../x"]}),
        "task name '../x' is not allowed",
    ),
    Row(
        "params-unknown-task",
        "cli",
        lambda t: _params(t, {"tasks": ["sst9"]}),
        "unknown task 'sst9'",
    ),
    Row(
        "params-unknown-key",
        "cli",
        lambda t: _params(t, {"finetune": {"stpes": 3}}),
        "finetune.stpes: unknown key",
    ),
    Row(
        "params-out-of-range-lr",
        "cli",
        lambda t: _params(t, {"finetune": {"lr": 5}}),
        "finetune.lr: Input should be less than 1",
    ),
    Row(
        "params-negative-steps",
        "cli",
        lambda t: _params(t, {"finetune": {"steps": -3}}),
        "finetune.steps: Input should be greater than 0",
    ),
    Row(
        "params-bad-checkpoint-every",
        "cli",
        lambda t: _params(t, {"finetune": {"checkpoint_every": -1}}),
        "finetune.checkpoint_every: Input should be greater than or equal to 0",
    ),
    Row(
        "params-unknown-method",
        "cli",
        lambda t: _params(t, {"evaluate": {"methods": {"magic": {}}}}),
        "evaluate.methods: unknown method 'magic'",
    ),
    Row(
        "params-unknown-hyperparameter",
        "cli",
        lambda t: _params(t, {"evaluate": {"methods": {"ties": {"densty": 0.2}}}}),
        "evaluate.methods.ties: densty",
    ),
    Row(
        "params-out-of-range-density",
        "cli",
        lambda t: _params(t, {"evaluate": {"methods": {"ties": {"density": 1.5}}}}),
        "evaluate.methods.ties: density",
    ),
    Row("params-not-yaml", "cli", lambda t: _params(t, "tasks: [a\nseed: : 1\n"), "not valid YAML"),
    Row(
        "params-top-level-list",
        "cli",
        lambda t: _params(t, "- 1\n- 2\n"),
        "expected a mapping at the top level",
    ),
    Row(
        "params-missing-file",
        "cli",
        lambda t: ["check-params", str(t / "nope.yaml")],
        "params file not found",
    ),
]

# ------------------------------------------------------------------------------ LoRA adapters


def _adapter(d: Path, *, r: int = 2, nan: bool = False, drop_b: bool = False, **cfg: Any) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(len(str(d)))
    m = "base_model.model.enc.query"
    sd = {
        f"{m}.lora_A.weight": torch.randn(r, 4, generator=g),
        f"{m}.lora_B.weight": torch.randn(4, r, generator=g),
    }
    if nan:
        sd[f"{m}.lora_B.weight"][0, 0] = float("nan")
    if drop_b:
        del sd[f"{m}.lora_B.weight"]
    save_file(sd, str(d / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": "m"}
    (d / "adapter_config.json").write_text(json.dumps({**conf, **cfg}))
    return d


def _lora(tmp: Path, **adapters: Path) -> Callable[[], Any]:
    from mergeflow.engine.lora import merge_lora_adapters

    return lambda: merge_lora_adapters(adapters, tmp / "out" / "merged", scaling=1.0)


def _pickled_adapter(tmp: Path) -> Callable[[], Any]:
    d = tmp / "pickled"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    (d / "adapter_config.json").write_text("{}")
    return _lora(tmp, a=_adapter(tmp / "a"), b=d)


LORA_ROWS = [
    Row(
        "lora-pickled-adapter", "call", _pickled_adapter, "pickled adapters are refused", MergeError
    ),
    Row(
        "lora-different-base-models",
        "call",
        lambda t: _lora(t, a=_adapter(t / "a"), b=_adapter(t / "b", base_model_name_or_path="x")),
        "adapter 'b' has base_model_name_or_path='x'",
        MergeError,
    ),
    Row(
        "lora-a-without-b",
        "call",
        lambda t: _lora(t, a=_adapter(t / "a", drop_b=True)),
        "'base_model.model.enc.query.lora_B.weight' is missing",
        MergeError,
    ),
    Row(
        "lora-nan",
        "call",
        lambda t: _lora(t, a=_adapter(t / "a"), b=_adapter(t / "b", nan=True)),
        "'base_model.model.enc.query.lora_B.weight' contains NaN",
        CheckpointError,
    ),
    Row(
        "lora-truncated",
        "call",
        lambda t: (
            lambda d: (
                (d / "adapter_model.safetensors").write_bytes(
                    (d / "adapter_model.safetensors").read_bytes()[:-3]
                )
                and _lora(t, a=d)
            )
        )(_adapter(t / "a")),
        "truncated or corrupted",
        CheckpointError,
    ),
]

# ------------------------------------------------------------------------------------- data


def _split_dir(tmp: Path, rows: list[dict] | bytes, split: str = "train") -> Path:
    d = tmp / "task"
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text(json.dumps({"label_names": ["neg", "pos"]}))
    raw = rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode()
    (d / f"{split}.jsonl").write_bytes(raw)
    return d


def _read_split(d: Path, split: str = "train") -> Callable[[], Any]:
    from mergeflow.data import read_split

    return lambda: read_split(d, split)


def _local(tmp: Path, name: str, raw: bytes, **kw: Any) -> Callable[[], Any]:
    from mergeflow.data import load_local

    (tmp / name).write_bytes(raw)
    return lambda: load_local(tmp / name, **kw)


DATA_ROWS = [
    Row(
        "data-non-utf8-csv",
        "call",
        lambda t: _local(t, "x.csv", "text,label\ncaf\xe9 ok,pos\nbad,neg\n".encode("latin-1")),
        "cannot parse as UTF-8 CSV",
        DataError,
    ),
    Row(
        "data-non-utf8-jsonl",
        "call",
        lambda t: _local(t, "x.jsonl", b'{"text": "caf\xe9", "label": "pos"}\n'),
        "not UTF-8",
        DataError,
    ),
    Row(
        "data-label-outside-label-names",
        "call",
        lambda t: _local(
            t,
            "x.jsonl",
            b'{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n',
            label_names=["neg", "pos"],
        ),
        "'label' is 'meh', not one of label_names",
        DataError,
    ),
    Row(
        "data-single-class",
        "call",
        lambda t: _local(
            t, "x.jsonl", b'{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n'
        ),
        "need at least 2 classes",
        DataError,
    ),
    Row(
        "data-split-label-outside-label-set",
        "call",
        lambda t: _read_split(
            _split_dir(t, [{"text": "a", "label": 0}, {"text": "b", "label": 7}])
        ),
        "train.jsonl:2: label 7 is outside the label set (0..1)",
        DataError,
    ),
    Row(
        "data-empty-split",
        "call",
        lambda t: _read_split(_split_dir(t, b"\n")),
        "train.jsonl: the split is empty",
        DataError,
    ),
    Row(
        "data-split-not-utf8",
        "call",
        lambda t: _read_split(_split_dir(t, b'{"text": "\xff", "label": 0}\n')),
        "train.jsonl: not UTF-8",
        DataError,
    ),
    Row(
        "data-task-name-path-traversal",
        "call",
        lambda t: (
            lambda: __import__("mergeflow.data", fromlist=["x"]).register_local_task(
                "../x",
                _local(t, "ok.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
                and t / "ok.jsonl",
            )
        ),
        "invalid task name '../x'",
        DataError,
    ),
]

# --------------------------------------------------------- real entry points in a subprocess

SLOW = [pytest.mark.slow]


def _stage_params(tmp: Path) -> Path:
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({"tasks": ["rotten_tomatoes"]}))
    return p


def _proc_stage_pickled_base(tmp: Path) -> list[str]:
    base = tmp / "base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return [
        sys.executable,
        str(ROOT / "stages" / "task_vectors.py"),
        "--params",
        str(_stage_params(tmp)),
        "--base",
        str(base),
        "--experts",
        str(tmp / "experts"),
        "--out",
        str(tmp / "out" / "merged"),
    ]


def _proc_stage_empty_split(tmp: Path) -> list[str]:
    d = _split_dir(tmp, b"")
    return [
        sys.executable,
        str(ROOT / "stages" / "finetune.py"),
        "--params",
        str(_stage_params(tmp)),
        "--task",
        "rotten_tomatoes",
        "--data",
        str(d),
        "--base",
        str(tmp / "base"),
        "--out",
        str(tmp / "out" / "merged"),
        "--metrics",
        str(tmp / "out" / "m.json"),
    ]


def _proc_stage_bad_params(tmp: Path) -> list[str]:
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({"tasks": ["../etc"]}))
    return [
        sys.executable,
        str(ROOT / "stages" / "prepare.py"),
        "--params",
        str(p),
        "--task",
        "../etc",
        "--out",
        str(tmp / "out" / "merged"),
    ]


PROC_ROWS = [
    Row(
        "proc-merge-nan",
        "proc",
        lambda t: [
            str(BIN / "mergeflow"),
            *_expert_with(t, _setitem("enc.w", torch.full((4, 3), float("nan")))),
        ],
        "tensor 'enc.w' contains non-finite values (12 NaN",
        marks=SLOW,
    ),
    Row(
        "proc-merge-pickled-expert",
        "proc",
        lambda t: [str(BIN / "mergeflow"), *_pickled_expert(t)],
        "pickled checkpoints are refused",
        marks=SLOW,
    ),
    Row(
        "proc-check-params-unknown-key",
        "proc",
        lambda t: [str(BIN / "mergeflow"), *_params(t, {"finetun": {}})],
        "finetun: unknown key",
        marks=SLOW,
    ),
    Row(
        "proc-stage-task-vectors-pickled-base",
        "proc",
        _proc_stage_pickled_base,
        "pytorch_model.bin: pickled checkpoints are refused",
        marks=SLOW,
    ),
    Row(
        "proc-stage-finetune-empty-split",
        "proc",
        _proc_stage_empty_split,
        "the split is empty",
        marks=SLOW,
    ),
    Row(
        "proc-stage-prepare-path-traversal",
        "proc",
        _proc_stage_bad_params,
        "task name '../etc' is not allowed",
        marks=SLOW,
    ),
]

ROWS = MERGE_ROWS + SAFETENSORS_ROWS + PARAMS_ROWS + LORA_ROWS + DATA_ROWS + PROC_ROWS


def _one_message(text: str, expect: str) -> None:
    """The real output holds ``expect``, exactly one ``error:`` line and no traceback."""
    flat = " ".join(text.split())
    assert expect in flat, f"expected {expect!r} in:\n{text}"
    assert flat.count("error:") == 1, f"expected one error line:\n{text}"
    assert "Traceback" not in text, text


def _as_a_stage_reports_it(made: Callable[[], Any], tmp: Path, monkeypatch, capsys) -> str:
    """Run ``made`` as a stage's ``run`` under the real :func:`mergeflow.stage.main`; its stderr.

    Catches (for ``call`` rows): an exception type the stages do not report as bad input (it
    would escape as a traceback) or a report without its ``error:`` line — the message is the
    one a user sees, not one this test writes.
    """
    import types

    from mergeflow import stage

    @dataclass
    class Paths:
        pass

    mod = types.ModuleType("_bad_input_stage")
    mod.Paths, mod.run = Paths, lambda cfg, paths: made()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(stage, "tune_malloc", lambda: False)  # leave this process's malloc alone
    params = tmp / "_stage_params.yaml"
    params.write_text("tasks: [rotten_tomatoes]\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        stage.main(mod.__name__, ["--params", str(params)])
    assert ex.value.code == 2, ex.value.code
    params.unlink()
    return capsys.readouterr().err


def _nothing_left(tmp: Path) -> None:
    out = tmp / "out" / "merged"
    assert not out.exists(), f"{out} was written"
    parent = out.parent
    if parent.exists():
        left = [p.name for p in parent.iterdir() if p.name.startswith(".") or "tmp" in p.name]
        assert not left, f"temp files left in {parent}: {left}"


def test_the_table_has_at_least_25_rows_and_unique_ids():
    assert len(ROWS) >= 25
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_docs_reliability_lists_exactly_these_rows():
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text()
    section = doc[doc.index("## Bad inputs") :]
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert listed == [r.id for r in ROWS]
    for r in ROWS:  # the documented message contains what the row asserts
        line = next(x for x in section.splitlines() if x.startswith(f"| `{r.id}` |"))
        assert r.expect.replace("|", "\\|") in line.replace("`", "'"), r.id


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input(row: Row, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    made = row.setup(tmp_path)
    if row.kind in ("merge", "cli"):
        from mergeflow.cli import app

        res = CliRunner().invoke(app, made)
        assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
        _one_message(res.output, row.expect)
    elif row.kind == "proc":
        env = {**os.environ, "COLUMNS": "400", "MERGEFLOW_TRACKING": "off"}
        p = subprocess.run(made, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
        assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
        _one_message(p.stdout + p.stderr, row.expect)
    else:
        assert row.exc is not None
        with pytest.raises(row.exc) as err:
            made()
        assert type(err.value) is row.exc or isinstance(err.value, row.exc)
        _one_message(_as_a_stage_reports_it(made, tmp_path, monkeypatch, capsys), row.expect)
    _nothing_left(tmp_path)
