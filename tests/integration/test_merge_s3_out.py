"""``mergeflow merge --out s3://…`` writes to a real S3 API (moto) and publishes atomically.

Before issue 22 the command reported success and wrote a local directory ``./s3:/bucket/…``.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mergeflow.engine import merge_checkpoints
from mergeflow.engine.checkpoint import Checkpoint
from mergeflow.io import CheckpointError
from tests.integration.conftest import aws_env
from tests.unit.test_engine import load_dir, make_state, write_ckpt

pytestmark = pytest.mark.integration
BUCKET = "mergeflow-out"


@pytest.fixture
def s3(moto_s3, tmp_path, monkeypatch):
    """Local inputs, an S3 filesystem on moto, its storage options and a fresh output URL."""
    import s3fs

    for k, v in aws_env(moto_s3).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"client_kwargs": {"endpoint_url": moto_s3}}
    fs = s3fs.S3FileSystem(**opts)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    base = make_state(0)
    write_ckpt(tmp_path / "base", base, shards=1)
    for i in range(2):
        write_ckpt(tmp_path / f"t{i}", make_state(10 + i, base=base), shards=2)
    prefix = f"{BUCKET}/{tmp_path.name}/merged"
    return fs, opts, prefix


def _args(tmp, opts, out, *extra):
    args = ["merge", "--method", "task_arithmetic", "--base", str(tmp / "base"), "--no-progress"]
    args += ["--expert", f"t0={tmp / 't0'}", "--expert", f"t1={tmp / 't1'}"]
    return [*args, "--storage-options", json.dumps(opts), "--out", out, *extra]


def _objects(fs, prefix):
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def test_cli_writes_to_s3_refuses_to_overwrite_and_replaces_with_force(s3, tmp_path):
    from mergeflow.cli import app

    fs, opts, prefix = s3
    url = f"s3://{prefix}"
    res = CliRunner().invoke(app, _args(tmp_path, opts, url, "--set", "scaling=0.3"))
    assert res.exit_code == 0, (res.output, res.exception)
    assert not (tmp_path / "s3:").exists()  # the old bug: a local directory named s3:
    merge_checkpoints(
        "task_arithmetic",
        str(tmp_path / "base"),
        {"t0": str(tmp_path / "t0"), "t1": str(tmp_path / "t1")},
        tmp_path / "ref",
        {"scaling": 0.3},
    )
    got = {k: Checkpoint(url, opts).get(k) for k in Checkpoint(url, opts).keys()}
    ref = load_dir(tmp_path / "ref")
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    first = _objects(fs, prefix)
    assert {p.rsplit("/", 1)[1] for p in first} == {p.name for p in (tmp_path / "ref").iterdir()}
    parent = prefix.rsplit("/", 1)[0]
    assert fs.ls(parent, detail=False) == [prefix]  # no temporary prefix left behind

    res = CliRunner().invoke(app, _args(tmp_path, opts, url, "--set", "scaling=1.0"))
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert flat.count("error:") == 1 and "Traceback" not in res.output
    assert "already exists and is not empty" in flat and "--force" in flat
    assert _objects(fs, prefix) == first

    fs.pipe_file(f"{prefix}/stale.txt", b"from an older run")
    res = CliRunner().invoke(app, _args(tmp_path, opts, url, "--set", "scaling=1.0", "--force"))
    assert res.exit_code == 0, (res.output, res.exception)
    after = _objects(fs, prefix)
    assert f"{prefix}/stale.txt" not in after
    assert after[f"{prefix}/model.safetensors"] != first[f"{prefix}/model.safetensors"]
    assert fs.ls(parent, detail=False) == [prefix]


def test_sharded_output_is_published_index_last_and_a_failed_publish_leaves_no_checkpoint(
    s3, tmp_path, monkeypatch
):
    fs, opts, prefix = s3
    url = f"s3://{prefix}"
    experts = {"t0": str(tmp_path / "t0"), "t1": str(tmp_path / "t1")}
    import fsspec

    assert fsspec.core.url_to_fs(url, **opts)[0] is fs  # one cached instance: patch its copy
    copies: list[str] = []
    real_copy = fs.copy

    def record(src, dst, *a, **k):
        copies.append(dst.rsplit("/", 1)[1])
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(fs, "copy", record)
    merge_checkpoints(
        "ties", str(tmp_path / "base"), experts, url, storage_options=opts, max_shard_bytes=600
    )
    assert copies[-2:] == ["model.safetensors.index.json", "mergeflow_merge.json"]
    assert sum(c.endswith(".safetensors") for c in copies) > 1  # sharded: the index is the key
    assert len(Checkpoint(url, opts).keys()) == len(make_state(0))

    def fail_on_index(src, dst, *a, **k):
        if dst.endswith("index.json"):
            raise OSError("injected: connection lost while publishing")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(fs, "copy", fail_on_index)
    url2 = url + "-2"
    with pytest.raises(OSError, match="injected"):
        merge_checkpoints(
            "ties", str(tmp_path / "base"), experts, url2, storage_options=opts, max_shard_bytes=600
        )
    fs.invalidate_cache()
    with pytest.raises(CheckpointError, match="no model.safetensors or"):
        Checkpoint(url2, opts)  # shards without their index: a reader sees no checkpoint
    parent = prefix.rsplit("/", 1)[0]
    assert not [p for p in fs.ls(parent, detail=False) if "/." in p]  # temp prefix removed


def test_output_to_a_missing_bucket_is_one_error_line(s3, tmp_path):
    from mergeflow.cli import app

    fs, opts, prefix = s3
    res = CliRunner().invoke(app, _args(tmp_path, opts, "s3://no-such-bucket-22/merged"))
    assert res.exit_code == 2, (res.output, res.exception)
    flat = " ".join(res.output.split())
    assert flat.count("error:") == 1 and "Traceback" not in res.output
    assert "s3://no-such-bucket-22/merged at http://127.0.0.1:" in flat
    assert "bucket does not exist; create the bucket or check the URL" in flat
    assert not (tmp_path / "s3:").exists()
