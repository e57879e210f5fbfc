"""Streaming merge engine: equals in-memory merge, writes loadable checkpoints, refuses bad input."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergeflow import methods
from mergeflow.cli import app
from mergeflow.engine import merge_checkpoints
from mergeflow.engine.checkpoint import Checkpoint
from mergeflow.io import CheckpointError
from mergeflow.methods import chunks, registry
from mergeflow.methods.select import select_ranks
from mergeflow.tensors import MergeError
from tests.helpers import forbid_full_sorts

SHAPES = {
    "emb.weight": (50, 8),
    "layer.0.w": (8, 8),
    "layer.0.b": (8,),
    "layer.1.w": (6, 8),
    "norm.scale": (),
}


def make_state(seed, dtype=torch.float32, base=None, step=0.1):
    g = torch.Generator().manual_seed(seed)
    if base is None:
        sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    else:
        sd = {
            k: (base[k].float() + step * torch.randn(s, generator=g)).to(base[k].dtype)
            for k, s in SHAPES.items()
        }
    sd["position_ids"] = torch.arange(12, dtype=torch.int64)
    if base is not None:
        sd["position_ids"] = sd["position_ids"] + 7  # experts' buffers must not leak
    return sd


def write_ckpt(d: Path, sd, shards=2, config=None):
    """Hugging Face layout: sharded with an index (shards > 1) or model.safetensors."""
    d.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(d / "model.safetensors"))
    else:
        wm = {}
        per = -(-len(keys) // shards)
        for i in range(shards):
            part = keys[i * per : (i + 1) * per]
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k].contiguous() for k in part}, str(d / name))
            wm.update(dict.fromkeys(part, name))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    cfg = config or {"model_type": "toy", "hidden_size": 8, "num_hidden_layers": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "vocab.txt").write_text("a\nb\n")
    return d


@pytest.fixture
def setup(tmp_path):
    base = make_state(0)
    experts = {f"t{i}": make_state(10 + i, base=base) for i in range(3)}
    write_ckpt(tmp_path / "base", base)
    for t, sd in experts.items():
        write_ckpt(tmp_path / t, sd, shards=3)
    paths = {t: str(tmp_path / t) for t in experts}
    return tmp_path, base, experts, paths


def load_dir(d):
    ck = Checkpoint(str(d))
    return {k: ck.get(k) for k in ck.keys()}


CASES = [(m, {}) for m in methods.available()] + [
    ("ties", {"scope": "tensor", "density": 0.3}),
    ("ties", {"scope": "global", "density": 0.3}),
    ("dare", {"combine": "ties", "rescale": "l1", "drop_rate": 0.5, "seed": 3}),
    ("dare", {"drop_rate": 0.3}),
    ("pcb", {"scope": "tensor"}),
    ("pcb", {"scope": "global", "ratio": 0.3, "clip": 0.01}),
    ("task_arithmetic", {"weights": {"t0": 1.0, "t1": -0.5, "t2": 0.25}, "scaling": 0.7}),
]


CASE_IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CASES)]


@pytest.fixture
def tiny_chunks(monkeypatch):
    # exercise chunking, histogram selection and the re-read path on tiny tensors
    monkeypatch.setattr(chunks, "CHUNK", 37)


def assert_bitwise_equal(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("method,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("cache_bytes", [0, 1 << 20], ids=["reread", "cached"])
def test_engine_equals_in_memory(setup, tiny_chunks, method, params, cache_bytes):
    # both run the method's registered prepare step and kernel: equal bit for bit
    tmp, base, experts, paths = setup
    out = tmp / "out"
    rep = merge_checkpoints(
        method, str(tmp / "base"), paths, out, params, cache_bytes=cache_bytes, workers=2
    )
    ref = methods.merge(method, base, experts, **params)
    got = load_dir(out)
    assert_bitwise_equal(got, ref)
    assert rep.copied == ["position_ids"]
    assert torch.equal(got["position_ids"], base["position_ids"])
    assert sorted(rep.side_files) == ["config.json", "vocab.txt"]
    meta = json.loads((out / "mergeflow_merge.json").read_text())
    assert meta["copied_from_base"] == ["position_ids"] and meta["method"] == method


def test_engine_mixed_dtypes_compute_fp32_write_base_dtype(tmp_path):
    base = make_state(0, dtype=torch.bfloat16)
    experts = {
        "a": make_state(1, base={k: v.half() for k, v in base.items()}),
        "b": make_state(2, base={k: v.float() for k, v in base.items()}),
    }
    write_ckpt(tmp_path / "base", base, shards=1)
    for t, sd in experts.items():
        write_ckpt(tmp_path / t, sd, shards=1)
    merge_checkpoints(
        "task_arithmetic",
        str(tmp_path / "base"),
        {t: str(tmp_path / t) for t in experts},
        tmp_path / "out",
        {"scaling": 0.5},
    )
    got = load_dir(tmp_path / "out")
    ref = methods.merge("task_arithmetic", base, experts, scaling=0.5)
    for k in ref:
        assert got[k].dtype == base[k].dtype
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("method,params", CASES, ids=CASE_IDS)
def test_engine_fp16_base_converted_slice_by_slice(tmp_path, monkeypatch, method, params):
    # a half-precision base larger than BaseF32.WHOLE is converted to float32 one chunk at a
    # time (never whole); the result must not change
    monkeypatch.setattr(chunks, "CHUNK", 37)
    monkeypatch.setattr(chunks.BaseF32, "WHOLE", 50)
    base = make_state(0, dtype=torch.float16)
    experts = {f"t{i}": make_state(10 + i, base=base) for i in range(3)}
    write_ckpt(tmp_path / "base", base, shards=1)
    for t, sd in experts.items():
        write_ckpt(tmp_path / t, sd, shards=1)
    out = tmp_path / "out"
    merge_checkpoints(
        method, str(tmp_path / "base"), {t: str(tmp_path / t) for t in experts}, out, params
    )
    with monkeypatch.context() as m:  # the reference converts the base whole
        m.setattr(chunks.BaseF32, "WHOLE", 1 << 22)
        ref = methods.merge(method, base, experts, **params)
    assert_bitwise_equal(load_dir(out), ref)


def _spy_kernels(monkeypatch):
    """Wrap every registered kernel and prepare step; record (method, tensor) per kernel call."""
    calls = []
    for name in methods.available():
        spec = registry.get(name)

        def kernel(inp, params, ctx, _spec=spec):
            calls.append((_spec.name, inp.name))
            return _spec.kernel(inp, params, ctx)

        monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, kernel=kernel))
    return calls


@pytest.mark.parametrize("method,params", CASES, ids=CASE_IDS)
def test_engine_and_in_memory_run_the_registered_kernel(setup, monkeypatch, method, params):
    # the kernel the registry holds is what both paths run, once per floating-point tensor
    tmp, base, experts, paths = setup
    calls = _spy_kernels(monkeypatch)
    merge_checkpoints(method, str(tmp / "base"), paths, tmp / "out", params)
    engine_calls = sorted(calls)
    calls.clear()
    methods.merge(method, base, experts, **params)
    floating = sorted((method, k) for k, v in base.items() if v.is_floating_point())
    assert engine_calls == floating
    assert sorted(calls) == floating


def test_engine_merges_a_newly_registered_method(setup):
    # a method the engine has never heard of: one kernel, streamed and in memory alike
    from pydantic import BaseModel, ConfigDict

    class P(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        scaling: float = 0.5

    @methods.register("_test_max_abs", P, paper="Nobody, 2099")
    def max_abs(inp, params, ctx):  # the largest-magnitude task vector entry
        tau = chunks.stacked(inp).reshape(len(inp.tasks), -1)
        return tau.gather(0, tau.abs().argmax(0, keepdim=True))[0]

    try:
        tmp, base, experts, paths = setup
        merge_checkpoints("_test_max_abs", str(tmp / "base"), paths, tmp / "out")
        assert_bitwise_equal(load_dir(tmp / "out"), methods.merge("_test_max_abs", base, experts))
    finally:
        registry._REGISTRY.pop("_test_max_abs", None)


def test_engine_has_no_method_code_of_its_own():
    # the engine imports no method module: every formula it runs comes through the registry
    method_modules = {registry.get(m).kernel.__module__ for m in methods.available()}
    engine_dir = Path(methods.__file__).parents[1] / "engine"
    for f in engine_dir.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert not names & method_modules, (f.name, names & method_modules)
    assert not (engine_dir / "kernels.py").exists()


def test_engine_output_is_sharded_and_atomic_replace(setup):
    tmp, base, experts, paths = setup
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="already exists and is not empty"):
        merge_checkpoints("ties", str(tmp / "base"), paths, out, max_shard_bytes=1000)
    assert (out / "old.txt").read_text() == "old"
    merge_checkpoints("ties", str(tmp / "base"), paths, out, max_shard_bytes=1000, force=True)
    assert not (out / "old.txt").exists()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    assert set(idx["weight_map"]) == set(base)
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def test_select_ranks_equals_kthvalue():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5001, generator=g)
    x[:, :2000] = 0.0
    x[1, 10] = -0.0
    ranks = [0, 1999, 2000, 2500, 5000]

    def chunks():
        return (x[:, i : i + 333] for i in range(0, 5001, 333))

    got = select_ranks(chunks, 3, ranks)
    ref = torch.stack([torch.stack([x[r].kthvalue(k + 1).values for k in ranks]) for r in range(3)])
    assert torch.equal(got, ref)


def test_ties_engine_never_sorts(setup, tiny_chunks, monkeypatch):
    """Catches: the streaming engine's TIES thresholds taken from a full sort via any entry
    point (``Tensor.sort``, ``torch.msort``, ``numpy.sort``, ...)."""
    tmp, base, experts, paths = setup
    forbid_full_sorts(monkeypatch)
    for scope in ("tensor", "global"):
        merge_checkpoints("ties", str(tmp / "base"), paths, tmp / scope, {"scope": scope})


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, ["merge", "--no-progress", *args])


def expert_args(paths):
    out = []
    for t, p in paths.items():
        out += ["--expert", f"{t}={p}"]
    return out


def test_cli_merge_and_recipe(setup):
    tmp, base, experts, paths = setup
    r = cli(
        "--method",
        "ties",
        "--base",
        str(tmp / "base"),
        *expert_args(paths),
        "--out",
        str(tmp / "o1"),
        "--set",
        "density=0.3",
        "--set",
        "scope=tensor",
    )
    assert r.exit_code == 0, r.output
    assert "copied from the base unchanged (1): position_ids" in r.output
    ref = methods.merge("ties", base, experts, density=0.3, scope="tensor")
    got = load_dir(tmp / "o1")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    recipe = tmp / "r.yaml"
    recipe.write_text(
        f"method: ties\nbase: {tmp / 'base'}\nout: {tmp / 'o2'}\n"
        f"experts: {json.dumps(paths)}\nparams: {{density: 0.3, scope: tensor}}\nworkers: 0\n"
    )
    r = cli("--recipe", str(recipe))
    assert r.exit_code == 0, r.output
    got2 = load_dir(tmp / "o2")
    assert all(torch.equal(got2[k], got[k]) for k in got)


def _bad(tmp, paths, *extra, method="task_arithmetic"):
    out = tmp / "bad_out"
    r = cli(
        "--method",
        method,
        "--base",
        str(tmp / "base"),
        *expert_args(paths),
        "--out",
        str(out),
        *extra,
    )
    assert r.exit_code == 2, r.output
    assert not out.exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    return " ".join(r.output.split())


def test_bad_different_architecture(setup):
    tmp, base, experts, paths = setup
    cfg = {"model_type": "toy", "hidden_size": 16, "num_hidden_layers": 2}
    (tmp / "t1" / "config.json").write_text(json.dumps(cfg))
    msg = _bad(tmp, paths)
    assert "t1" in msg and "different architecture" in msg and "hidden_size" in msg


def test_bad_shape_mismatch(setup):
    tmp, base, experts, paths = setup
    sd = dict(experts["t2"])
    sd["layer.1.w"] = torch.zeros(8, 6)
    write_ckpt(tmp / "t2b", sd, shards=1)
    msg = _bad(tmp, {**paths, "t2": str(tmp / "t2b")})
    assert "'layer.1.w'" in msg and "(8, 6)" in msg and "(6, 8)" in msg and "t2" in msg


def test_bad_missing_tensor(setup):
    tmp, base, experts, paths = setup
    sd = {k: v for k, v in experts["t0"].items() if k != "layer.0.b"}
    write_ckpt(tmp / "t0b", sd, shards=1)
    msg = _bad(tmp, {**paths, "t0": str(tmp / "t0b")})
    assert "missing tensor 'layer.0.b'" in msg and "t0" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_non_finite(setup, value):
    tmp, base, experts, paths = setup
    sd = {k: v.clone() for k, v in experts["t1"].items()}
    sd["layer.1.w"][2, 3] = value
    write_ckpt(tmp / "t1b", sd, shards=1)
    msg = _bad(tmp, {**paths, "t1": str(tmp / "t1b")})
    assert "'layer.1.w'" in msg and "t1b" in msg and "non-finite" in msg


def test_bad_empty_expert_list(setup):
    tmp, *_ = setup
    msg = _bad(tmp, {})
    assert "at least one" in msg


def test_bad_unknown_method_and_hyperparameter(setup):
    tmp, base, experts, paths = setup
    msg = _bad(tmp, paths, method="nope")
    assert "unknown method 'nope'" in msg and "ties" in msg
    msg = _bad(tmp, paths, "--set", "lamda=0.3", method="ties")
    assert "unknown hyperparameter 'lamda'" in msg
    msg = _bad(tmp, paths, "--set", "density=2", method="ties")
    assert "'density'" in msg and "allowed" in msg


def test_bad_pickle_refused_with_how_to_convert(setup):
    tmp, base, experts, paths = setup
    d = tmp / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (d / "config.json").write_text("{}")
    msg = _bad(tmp, {**paths, "t0": str(d)})
    assert "pytorch_model.bin" in msg and "refused" in msg and "safe_serialization" in msg
    msg = _bad(tmp, {**paths, "t0": str(d / "pytorch_model.bin")})
    assert "refused" in msg and "save_file" in msg


def test_bad_truncated_safetensors(setup):
    tmp, base, experts, paths = setup
    sd = experts["t0"]
    write_ckpt(tmp / "t0t", sd, shards=1)
    f = tmp / "t0t" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    msg = _bad(tmp, {**paths, "t0": str(tmp / "t0t")})
    assert "model.safetensors" in msg and "truncated" in msg


def test_bad_input_raises_typed_errors(setup):
    tmp, base, experts, paths = setup
    with pytest.raises(MergeError, match="at least one"):
        merge_checkpoints("ties", str(tmp / "base"), {}, tmp / "x")
    with pytest.raises(CheckpointError, match="not found"):
        merge_checkpoints("ties", str(tmp / "nowhere"), paths, tmp / "x")
    assert not (tmp / "x").exists()


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 0.9999])
def test_kth_smallest_equals_kthvalue(q):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300_000, generator=g).half().float().abs()  # many exact ties, like fp16 deltas
    x[:50_000] = 0.0
    k = max(1, int(q * x.numel()))
    assert chunks.kth_smallest(x, k) == float(torch.kthvalue(x, k).values)


def test_output_loads_with_automodel_from_pretrained(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    base = BertModel(cfg)
    base.save_pretrained(tmp_path / "base")
    paths = {}
    for t in ("a", "b"):
        m = BertModel(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        m.save_pretrained(tmp_path / t)
        paths[t] = str(tmp_path / t)
    rep = merge_checkpoints(
        "ties", str(tmp_path / "base"), paths, tmp_path / "out", max_shard_bytes=20_000
    )
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert "config.json" in rep.side_files
    merged = AutoModel.from_pretrained(tmp_path / "out")
    ref = methods.merge(
        "ties", load_dir(tmp_path / "base"), {t: load_dir(p) for t, p in paths.items()}
    )
    sd = merged.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v)
