"""The merge engine reads base and experts from a real S3 API (moto) on 127.0.0.1."""

import pytest
import torch

from mergeflow import methods
from mergeflow.engine import merge_checkpoints
from tests.unit.test_engine import cli, load_dir, make_state, write_ckpt

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_models(moto_s3, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    opts = {"client_kwargs": {"endpoint_url": moto_s3}}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"models-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs.mkdir(bucket)
    base = make_state(0)
    experts = {f"t{i}": make_state(10 + i, base=base) for i in range(2)}
    write_ckpt(tmp_path / "base", base, shards=1)
    fs.put(str(tmp_path / "base"), f"{bucket}/base", recursive=True)
    for t, sd in experts.items():
        write_ckpt(tmp_path / t, sd, shards=2)
        fs.put(str(tmp_path / t), f"{bucket}/{t}", recursive=True)
    fs.invalidate_cache()
    return bucket, opts, base, experts


def test_engine_reads_from_s3(s3_models, tmp_path):
    bucket, opts, base, experts = s3_models
    paths = {t: f"s3://{bucket}/{t}" for t in experts}
    rep = merge_checkpoints(
        "ties",
        f"s3://{bucket}/base",
        paths,
        tmp_path / "out",
        {"density": 0.5},
        storage_options=opts,
    )
    ref = methods.merge("ties", base, experts, density=0.5)
    got = load_dir(tmp_path / "out")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    assert rep.copied == ["position_ids"] and "config.json" in rep.side_files


def test_cli_reads_from_s3_and_reports_missing_object(s3_models, tmp_path):
    import json

    bucket, opts, base, experts = s3_models
    args = [
        "--method",
        "task_arithmetic",
        "--base",
        f"s3://{bucket}/base",
        "--storage-options",
        json.dumps(opts),
        "--set",
        "scaling=1.0",
    ]
    for t in experts:
        args += ["--expert", f"{t}=s3://{bucket}/{t}"]
    r = cli(*args, "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    ref = methods.merge("task_arithmetic", base, experts, scaling=1.0)
    got = load_dir(tmp_path / "out")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    r = cli(*args, "--expert", f"t9=s3://{bucket}/nothing-here", "--out", str(tmp_path / "o2"))
    assert r.exit_code == 2 and "not found" in r.output
    assert not (tmp_path / "o2").exists()
