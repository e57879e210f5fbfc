"""SIGKILL the real ``mergeflow merge`` while it writes a multi-shard output, at several points.

After each kill the output directory is byte-identical to the previous complete merge (old) or
to the new one, never a mix; a rerun completes and sweeps the killed writers' temp dirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergeflow.engine.run import merge_checkpoints
from mergeflow.io import tree_md5

pytestmark = [pytest.mark.slow]
BIN = Path(sys.executable).parent
N_TENSORS, SIDE, SHARD = 48, 384, 4 * 384 * 384 * 4  # 48 × 576 KiB, 4 tensors per shard


def _ckpt(d: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True)
    save_file(
        {f"layer{i}.w": torch.randn(SIDE, SIDE, generator=g) for i in range(N_TENSORS)},
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text('{"model_type": "bert", "hidden_size": 384}')
    return d


def _recipe(tmp: Path, out: Path, scaling: float) -> Path:
    r = tmp / f"recipe-{scaling}.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "base": str(tmp / "base"),
                "out": str(out),
                "experts": {"a": str(tmp / "a"), "b": str(tmp / "b")},
                "params": {"density": 0.5, "scaling": scaling, "scope": "tensor"},
                "workers": 0,
                "max_shard_bytes": SHARD,
            }
        )
    )
    return r


def _shards_in_temp(parent: Path) -> int:
    n = 0
    for d in parent.glob(".merged.pid*.tmp"):
        n = max(n, len(list(d.glob("model-*.safetensors"))))
    return n


def test_killed_merge_leaves_old_or_new_output_and_rerun_completes(tmp_path):
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        _ckpt(tmp_path / name, seed)
    out = tmp_path / "models" / "merged"
    new_ref, old_ref = tmp_path / "ref_new", tmp_path / "ref_old"
    experts = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    for ref, scaling in ((old_ref, 0.3), (new_ref, 1.0)):
        merge_checkpoints(
            "ties",
            str(tmp_path / "base"),
            experts,
            ref,
            {"density": 0.5, "scaling": scaling, "scope": "tensor"},
            workers=0,
            max_shard_bytes=SHARD,
        )
    assert len(list(new_ref.glob("model-*.safetensors"))) == N_TENSORS // 4
    # mergeflow_merge.json names inputs, not the output: equal trees mean equal merges
    old_md5, new_md5 = tree_md5(old_ref), tree_md5(new_ref)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "mergeflow"), "merge", "--no-progress", "--force"]  # replaces the old merge
    subprocess.run(
        [*cmd, "--recipe", str(_recipe(tmp_path, out, 0.3))],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert tree_md5(out) == old_md5
    outcomes = []
    for k in (1, 5, 11):  # shards already in the temp dir when the kill lands
        p = subprocess.Popen(
            [*cmd, "--recipe", str(_recipe(tmp_path, out, 1.0))],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while p.poll() is None and _shards_in_temp(out.parent) < k:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        got = tree_md5(out)
        assert got in (old_md5, new_md5), f"kill at {k} shards left a mixed output"
        outcomes.append("old" if got == old_md5 else "new")
    assert "old" in outcomes  # at least one kill landed mid-write
    p = subprocess.run(
        [*cmd, "--recipe", str(_recipe(tmp_path, out, 1.0))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert tree_md5(out) == new_md5
    assert sorted(os.listdir(out.parent)) == ["merged"]  # dead writers' temp dirs swept
