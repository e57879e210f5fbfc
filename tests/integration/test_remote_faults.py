"""S3 faults end in one explicit error naming endpoint and bucket (real moto servers, bounded)."""

from __future__ import annotations

import time

import pytest

from mergeflow.remote import RemoteError, S3Remote, check, remote_from_env
from tests.integration.conftest import BIN, SECRET, aws_env, free_port, start, stop, wait_http

pytestmark = [pytest.mark.integration]


@pytest.fixture(autouse=True)
def _creds(monkeypatch):
    for k, v in aws_env("").items():
        monkeypatch.setenv(k, v)


def test_remote_from_env(monkeypatch):
    monkeypatch.delenv("MERGEFLOW_S3_BUCKET", raising=False)
    assert remote_from_env() is None
    monkeypatch.setenv("MERGEFLOW_S3_BUCKET", "b1x")
    monkeypatch.setenv("MERGEFLOW_S3_ENDPOINT", "http://127.0.0.1:9")
    r = remote_from_env()
    assert r.url == "s3://b1x/dvc" and r.endpoint == "http://127.0.0.1:9"


def test_unreachable_endpoint_names_endpoint_and_bucket():
    endpoint = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        check(S3Remote("mergeflow-dvc", "dvc", endpoint))
    # the promise is "bounded" (one HeadBucket, 5 s timeouts, no retries): a generous limit that
    # only a hang or a retry loop exceeds, not a loaded machine
    assert time.monotonic() - t0 < 60
    msg = str(err.value)
    assert "unreachable" in msg and endpoint in msg and "s3://mergeflow-dvc/dvc" in msg
    assert SECRET not in msg


def test_missing_bucket(moto_s3):
    with pytest.raises(RemoteError, match="'no-such-bucket' does not exist"):
        check(S3Remote("no-such-bucket", "dvc", moto_s3))
    check(S3Remote("mergeflow-dvc", "dvc", moto_s3))  # the real one is fine


def test_wrong_credentials_names_endpoint_and_bucket(tmp_path):
    """A moto server that authenticates every request (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = free_port()
    proc = start(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        tmp_path / "moto.log",
        {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", 30, proc)
        with pytest.raises(RemoteError) as err:
            check(S3Remote("mergeflow-dvc", "dvc", endpoint))
    finally:
        stop(proc)
    msg = str(err.value)
    assert "rejected the credentials" in msg and endpoint in msg and "mergeflow-dvc" in msg
    assert SECRET not in msg
