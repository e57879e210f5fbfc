from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.io import (
    CheckpointError,
    SafetensorsFile,
    atomic_dir,
    check_finite,
    load_state_dict,
    save_state_dict,
    tree_md5,
)


def sd():
    return {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "ids": torch.arange(4, dtype=torch.int64),
        "scalar": torch.tensor(3.0, dtype=torch.float16),
    }


def test_lazy_reader_matches_safetensors(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(sd(), p, metadata={"k": "v"})
    f = SafetensorsFile(p)
    assert set(f.keys()) == set(sd())
    assert f.metadata == {"k": "v"}
    assert f.shape("a") == (2, 3) and f.dtype("b") == torch.bfloat16
    for k, v in sd().items():
        assert f.get(k).equal(v)
    assert load_state_dict(p, keys=["a"])["a"].equal(sd()["a"])


def test_save_is_atomic_and_round_trips(tmp_path):
    p = tmp_path / "sub" / "m.safetensors"
    save_state_dict(sd(), p, metadata={"x": "1"})
    assert load_state_dict(p)["ids"].equal(sd()["ids"])
    assert [q.name for q in p.parent.iterdir()] == ["m.safetensors"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)


def test_missing_tensor_and_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(sd(), p)
    with pytest.raises(CheckpointError, match="'zz' is missing"):
        SafetensorsFile(p).get("zz")
    with pytest.raises(CheckpointError, match="not found"):
        SafetensorsFile(tmp_path / "none.safetensors")


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(sd(), p)
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        SafetensorsFile(p)
    p.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(p)


def test_oversized_or_garbage_header_is_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(p)
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="offsets"):
        SafetensorsFile(p)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "x.pt", "y.ckpt", "z.pth"])
def test_pickles_are_refused_with_how_to_convert(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors"):
        SafetensorsFile(p)


def test_nan_is_reported_with_tensor_name():
    with pytest.raises(CheckpointError, match="'w'"):
        check_finite({"w": torch.tensor([1.0, float("nan")])}, "expert x")
    check_finite({"i": torch.tensor([1, 2])}, "ok")


def test_atomic_dir_keeps_old_artifact_on_failure(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as d:
        (d / "f.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "f.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "f.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["art"]
    with atomic_dir(out) as d:
        (d / "g.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["g.txt"]


def test_tree_md5_depends_on_content_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "s").mkdir(parents=True)
        (d / "s" / "x").write_text("1")
    (b / ".hidden").write_text("ignored")
    assert tree_md5(a) == tree_md5(b)
    (b / "s" / "x").write_text("2")
    assert tree_md5(a) != tree_md5(b)


def test_atomic_dir_swaps_in_one_step_and_sweeps_dead_writers_leftovers(tmp_path):
    from mergeflow.io.safetensors_io import _exchange

    out = tmp_path / "art"
    with atomic_dir(out) as d:
        (d / "f.txt").write_text("old")
    # a writer killed mid-way (pid 2**22 + 1 is above pid_max's default, so never alive)
    dead = 2**22 + 1
    (tmp_path / f".art.pid{dead}.x1.tmp").mkdir()
    (tmp_path / f".art.pid{dead}.x1.tmp" / "half").write_text("partial")
    (tmp_path / f".f.json.pid{dead}.y.tmp").write_text("{")
    live = tmp_path / f".art.pid{os.getpid()}.z.tmp"  # a live writer's temp dir is kept
    live.mkdir()
    with atomic_dir(out) as d:
        (d / "g.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["g.txt"]
    assert sorted(os.listdir(tmp_path)) == [live.name, f".f.json.pid{dead}.y.tmp", "art"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("file")
    if _exchange(a, b):
        assert a.is_file() and b.is_dir()


def test_atomic_dir_restores_old_artifact_moved_aside_by_a_killed_writer(tmp_path):
    dead = 2**22 + 1
    aside = tmp_path / f".art.old-{dead}"
    aside.mkdir()
    (aside / "f.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "art"):
        raise RuntimeError("fails before the swap")
    assert (tmp_path / "art" / "f.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_saved_safetensors_are_byte_identical_across_processes(tmp_path):
    """safetensors orders header metadata by a per-process hash seed; mergeflow sorts it, so a
    rerun of a stage writes the same bytes (the same DVC hash)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\nfrom mergeflow.io import save_state_dict\n"
        "save_state_dict({'w': torch.arange(6.).reshape(2, 3), 'b': torch.ones(2)}, sys.argv[1],"
        " metadata={f'k{i}': str(i) for i in range(12)})\n"
    )
    outs = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for out in outs:
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    assert len({o.read_bytes() for o in outs}) == 1
    from mergeflow.io import load_state_dict

    got = load_state_dict(outs[0])
    assert torch.equal(got["w"], torch.arange(6.0).reshape(2, 3))
