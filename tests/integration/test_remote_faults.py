"""S3 faults end in one explicit error naming endpoint and bucket (real moto servers, bounded)."""

from __future__ import annotations

import urllib.request

import pytest

from mergeflow.remote import RemoteError, S3Remote, check, remote_from_env
from tests.integration.conftest import SECRET, aws_env, free_port

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
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with pytest.raises(RemoteError) as err:
        check(S3Remote("mergeflow-dvc", "dvc", endpoint))
    msg = str(err.value)
    assert "unreachable" in msg and endpoint in msg and "s3://mergeflow-dvc/dvc" in msg
    assert SECRET not in msg


def test_silent_endpoint_gets_one_request_and_a_timeout(black_hole):
    """Catches: a check that retries or waits forever on an endpoint that accepts connections
    and never answers — judged by the connections it made (exactly one: botocore's legacy
    ``retries={"max_attempts": 1}`` made two, fixed in remote.check), and by returning at all
    (its read timeout), not by a wall-clock bound."""
    with pytest.raises(RemoteError) as err:
        check(S3Remote("mergeflow-dvc", "dvc", black_hole.url), timeout_s=1.0)
    msg = str(err.value)
    assert "unreachable" in msg and "timeout" in msg.lower() and black_hole.url in msg
    assert black_hole.connections() == 1


def test_missing_bucket(moto_s3):
    with pytest.raises(RemoteError, match="'no-such-bucket' does not exist"):
        check(S3Remote("no-such-bucket", "dvc", moto_s3))
    check(S3Remote("mergeflow-dvc", "dvc", moto_s3))  # the real one is fine


@pytest.fixture
def authenticating(moto_s3):
    """The session's moto server authenticating every request (moto's ``/moto-api/reset-auth``,
    what ``INITIAL_NO_AUTH_ACTION_COUNT=0`` does at start-up), back to no auth afterwards."""

    def reset_auth(count: str) -> None:
        req = urllib.request.Request(  # a form content type would hide the body from moto
            moto_s3 + "/moto-api/reset-auth", data=count.encode(), headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200

    reset_auth("0")
    try:
        yield moto_s3
    finally:
        reset_auth("inf")


def test_wrong_credentials_names_endpoint_and_bucket(authenticating):
    with pytest.raises(RemoteError) as err:
        check(S3Remote("mergeflow-dvc", "dvc", authenticating))
    msg = str(err.value)
    assert "rejected the credentials" in msg and authenticating in msg and "mergeflow-dvc" in msg
    assert SECRET not in msg
