"""The DVC S3 remote, configured from the environment, and ``mergeflow pull <run id | git rev>``.

Environment (nothing server-specific lives in the repo):

| variable | meaning |
|---|---|
| ``MERGEFLOW_S3_BUCKET`` | bucket of the DVC remote (enables the remote) |
| ``MERGEFLOW_S3_PREFIX`` | key prefix inside the bucket (default ``dvc``) |
| ``MERGEFLOW_S3_ENDPOINT`` | S3 endpoint (MinIO, moto); else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` |
| ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` | credentials (read by boto) |

The remote is written to ``.dvc/config.local`` (endpoint and URL only; credentials stay in the
environment and are never written or logged). Every S3 failure becomes a :class:`RemoteError`
naming the endpoint and bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REMOTE_NAME = "mergeflow-s3"


class RemoteError(RuntimeError):
    """The S3 remote is unreachable, rejects the credentials, or a pull cannot be satisfied."""


@dataclass(frozen=True)
class S3Remote:
    """Where the DVC objects live."""

    bucket: str
    prefix: str = "dvc"
    endpoint: str | None = None

    @property
    def url(self) -> str:
        """``s3://bucket/prefix``."""
        return (
            f"s3://{self.bucket}/{self.prefix.strip('/')}" if self.prefix else f"s3://{self.bucket}"
        )

    def describe(self) -> str:
        """``s3://bucket/prefix at <endpoint>`` for error messages."""
        return f"{self.url} at {self.endpoint or 'the default AWS endpoint'}"


def remote_from_env(env: dict[str, str] | None = None) -> S3Remote | None:
    """The S3 remote described by the environment, or None if ``MERGEFLOW_S3_BUCKET`` is unset."""
    env = dict(os.environ if env is None else env)
    bucket = env.get("MERGEFLOW_S3_BUCKET", "").strip()
    if not bucket:
        return None
    endpoint = (
        env.get("MERGEFLOW_S3_ENDPOINT")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or None
    )
    return S3Remote(bucket, env.get("MERGEFLOW_S3_PREFIX", "dvc"), endpoint)


def require_remote_from_env() -> S3Remote:
    """Like :func:`remote_from_env`, but a missing bucket is an error saying what to set."""
    r = remote_from_env()
    if r is None:
        raise RemoteError("no DVC remote: set MERGEFLOW_S3_BUCKET (and MERGEFLOW_S3_ENDPOINT)")
    return r


def check(remote: S3Remote, timeout_s: float = 5.0) -> None:
    """Fail fast, naming endpoint and bucket, if the bucket cannot be reached with these credentials.

    One ``HeadBucket`` request, bounded by ``timeout_s`` and no retries.
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    cfg = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1})
    try:
        s3 = boto3.client("s3", endpoint_url=remote.endpoint, config=cfg)
        s3.head_bucket(Bucket=remote.bucket)
    except NoCredentialsError:
        raise RemoteError(
            f"no S3 credentials for {remote.describe()}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
        ) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            raise RemoteError(
                f"bucket {remote.bucket!r} does not exist at {remote.describe()}"
            ) from None
        if status in (401, 403) or code in (
            "403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
        ):
            raise RemoteError(
                f"S3 rejected the credentials for {remote.describe()} ({code or status}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from None
        raise RemoteError(f"S3 error for {remote.describe()}: {code or status}") from None
    except (BotoCoreError, OSError) as err:
        raise RemoteError(f"S3 endpoint unreachable for {remote.describe()}: {err}") from None


def _endpoint_of(storage_options: Mapping | None) -> str:
    opts = dict(storage_options or {})
    client = opts.get("client_kwargs") if isinstance(opts.get("client_kwargs"), dict) else {}
    return (
        client.get("endpoint_url")
        or opts.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the default AWS endpoint"
    )


def object_store_error(
    err: BaseException, url: str, storage_options: Mapping | None = None
) -> RemoteError | None:
    """The one-line :class:`RemoteError` for an object-store failure, or None if ``err`` is not one.

    Covers what botocore/s3fs raise for ``url`` (an ``s3://…`` input or output read or written
    through fsspec): missing or rejected credentials, a missing bucket or object, an unreachable
    endpoint, another S3 error, and an fsspec option the store does not accept (a bad
    ``--storage-options`` key).

    Args:
        err: The exception raised.
        url: The object-store path being read or written.
        storage_options: The fsspec options in use (the endpoint is named from them).

    """
    where = f"{url} at {_endpoint_of(storage_options)}"
    if isinstance(err, TypeError):
        m = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        if not m:
            return None
        proto = url.split("://", 1)[0]
        return RemoteError(
            f"--storage-options: {proto} does not accept {m.group(1)!r}; for another endpoint use "
            '{"client_kwargs": {"endpoint_url": "http://host:port"}}'
        )
    try:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:  # no S3 support installed: nothing of botocore's to translate
        return None
    if isinstance(err, NoCredentialsError):
        return RemoteError(
            f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(err, FileNotFoundError):  # s3fs's translation of NoSuchBucket / NoSuchKey
        return RemoteError(f"{where}: {err}; create the bucket or check the URL")
    if isinstance(err, PermissionError):  # s3fs's translation of AccessDenied / bad keys
        return RemoteError(
            f"S3 rejected the credentials for {where} ({err}): check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY and the bucket's policy"
        )
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        return RemoteError(f"S3 error for {where}: {code or err}")
    if isinstance(err, BotoCoreError):
        return RemoteError(f"S3 endpoint unreachable for {where}: {err}")
    return None


@contextlib.contextmanager
def object_store_errors(url: str, storage_options: Mapping | None = None) -> Iterator[None]:
    """Turn object-store failures inside the block into :class:`RemoteError` naming ``url``.

    Local paths pass through untouched; other exceptions are re-raised as they are.
    """
    if "://" not in str(url) or str(url).startswith("file://"):
        yield
        return
    try:
        yield
    except RemoteError:
        raise
    except Exception as err:
        mapped = object_store_error(err, str(url), storage_options)
        if mapped is None:
            raise
        raise mapped from None


def _dvc(root: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def configure(root: str | Path, remote: S3Remote) -> None:
    """Write the remote (URL, endpoint; never credentials) to ``.dvc/config.local`` as default."""
    root = Path(root)
    steps = [("remote", "add", "--local", "--force", "--default", REMOTE_NAME, remote.url)]
    if remote.endpoint:
        steps.append(("remote", "modify", "--local", REMOTE_NAME, "endpointurl", remote.endpoint))
    for args in steps:
        proc = _dvc(root, *args, timeout=120)
        if proc.returncode != 0:
            raise RemoteError(f"dvc {' '.join(args[:2])} failed in {root}: {proc.stderr.strip()}")


def _transfer(root: Path, verb: str, remote: S3Remote) -> str:
    configure(root, remote)
    check(remote)
    proc = _dvc(root, verb, "--remote", REMOTE_NAME)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RemoteError(f"dvc {verb} to {remote.describe()} failed: {' '.join(tail)}")
    return (proc.stdout.strip().splitlines() or ["nothing to do"])[-1]


def push(root: str | Path, remote: S3Remote | None = None) -> str:
    """``dvc push`` every cached output to the remote; returns DVC's summary line."""
    return _transfer(Path(root), "push", remote or require_remote_from_env())


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def _is_git_rev(root: Path, ref: str) -> bool:
    return (
        _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).returncode
        == 0
    )


def _restore_run_files(root: Path, run_id: str) -> str:
    """Check out the run's git commit, then its logged ``dvc.lock``/params/metrics over it."""
    from mlflow.exceptions import MlflowException

    from mergeflow.tracking import _mlflow, check_server

    check_server()
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RemoteError(
            f"{run_id!r} is neither a git revision nor an MLflow run: {err}"
        ) from None
    commit = run.data.tags.get("mergeflow.results_commit") or run.data.tags.get(
        "mlflow.source.git.commit", ""
    )
    commit = commit.removesuffix("-dirty")
    if commit and commit != "unknown":
        if not _is_git_rev(root, commit):
            raise RemoteError(f"run {run_id} was made at commit {commit}, which is not in {root}")
        _git(root, "checkout", "--quiet", commit)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = Path(
                mlflow.artifacts.download_artifacts(f"runs:/{run_id}/workspace", dst_path=tmp)
            )
        except (MlflowException, OSError) as err:
            raise RemoteError(
                f"run {run_id} has no workspace/ artifacts (dvc.lock): {err}"
            ) from None
        if not (got / "dvc.lock").is_file():
            raise RemoteError(f"run {run_id} has no workspace/dvc.lock artifact")
        for f in got.rglob("*"):
            if f.is_file():
                dest = root / f.relative_to(got)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
    return commit


def pull(ref: str, root: str | Path = ".", remote: S3Remote | None = None) -> dict[str, str]:
    """Restore exactly the artifacts of ``ref`` (a git revision or an MLflow flow-run id) in ``root``.

    A git revision is checked out (the work tree must be clean); an MLflow run id checks out the
    run's commit and then its logged ``dvc.lock`` (and params/metrics). ``dvc pull`` then fetches
    every cached output from the S3 remote and the md5 of each is verified against ``dvc.lock``.

    Returns:
        Output path → md5 as restored.
    """
    root = Path(root).resolve()
    remote = remote or require_remote_from_env()
    if _git(root, "status", "--porcelain", "--untracked-files=no", check=False).stdout.strip():
        raise RemoteError(f"{root} has uncommitted changes; pull into a clean clone")
    if _is_git_rev(root, ref):
        _git(root, "checkout", "--quiet", ref)
    elif re.fullmatch(r"[0-9a-f]{32}", ref):
        _restore_run_files(root, ref)
    else:
        raise RemoteError(f"{ref!r} is neither a git revision in {root} nor an MLflow run id")
    _transfer(root, "pull", remote)
    return verify(root)


def verify(root: str | Path) -> dict[str, str]:
    """Check every cached output of ``dvc.lock`` against the work tree; returns path → md5."""
    import yaml

    root = Path(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    expected = {
        o["path"]: o["md5"]
        for entry in (lock.get("stages") or {}).values()
        for o in entry.get("outs", []) or []
        if o.get("md5")
    }
    proc = _dvc(root, "status", "--json")
    if proc.returncode != 0:
        raise RemoteError(f"dvc status failed after pull: {proc.stderr.strip()}")
    bad = []
    for entries in (json.loads(proc.stdout or "{}") or {}).values():
        for e in entries:
            if isinstance(e, dict):
                bad += [p for p in (e.get("changed outs") or {}) if p in expected]
    missing = [p for p in expected if not (root / p).exists()]
    if bad or missing:
        raise RemoteError(
            f"after pull these outputs do not match dvc.lock: {sorted(set(bad + missing))}"
        )
    return expected
