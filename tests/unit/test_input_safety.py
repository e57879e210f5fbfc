"""`mergeflow merge` outputs and checkpoint inputs under careless and hostile use (issue 22).

One row per case. Every row runs ``mergeflow merge`` in-process and asserts exit status 2, exactly
one ``error:`` line containing the row's expected text, no traceback, and that nothing under the
test's directory changed: the same paths, the same bytes in every regular file (a user's existing
``--out`` survives untouched) and no ``merged`` output or temp file anywhere. A row that would hang
(a FIFO opened for reading) is stopped by an alarm after ``DEADLINE_S`` and fails.
``docs/reliability.md`` ("Merge outputs and checkpoint inputs") lists these rows with their messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergeflow.engine import merge_checkpoints
from tests.unit.test_bad_inputs import _ckpt, _one_message, _raw_safetensors, _sd, merge_args

DEADLINE_S = 30  # the unreachable-endpoint row waits for botocore's retries (~10 s)
DEAD_ENDPOINT = json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})


@dataclass
class Row:
    """One case: ``setup(tmp)`` builds the inputs and returns the ``mergeflow`` argv."""

    id: str
    setup: Callable[[Path], list[str]]
    expect: str
    env: dict[str, str | None] | None = None


def _out(args: list[str], out: Path | str) -> list[str]:
    return [*args[:-1], str(out)]


def _existing_dir(tmp: Path) -> list[str]:
    out = tmp / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    return _out(merge_args(tmp), out)


def _existing_file(tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("keep me")
    return _out(merge_args(tmp), tmp / "notes.txt")


def _previous_merge(tmp: Path) -> list[str]:
    args = _out(merge_args(tmp), tmp / "prev")
    merge_checkpoints(
        "task_arithmetic",
        str(tmp / "base"),
        {"a": str(tmp / "ex_a"), "b": str(tmp / "ex_b")},
        tmp / "prev",
    )
    return args


def _out_inside_base(tmp: Path) -> list[str]:
    return _out(merge_args(tmp), tmp / "base" / "merged")


def _fifo_weights(tmp: Path) -> list[str]:
    d = tmp / "ex_a"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    return merge_args(tmp, experts={"a": d})


def _fifo_weights_file(tmp: Path) -> list[str]:
    os.mkfifo(tmp / "a.safetensors")
    return merge_args(tmp, experts={"a": tmp / "a.safetensors"})


def _fifo_side_file(tmp: Path) -> list[str]:
    base = _ckpt(tmp / "base")
    os.mkfifo(base / "tokenizer.json")
    return merge_args(tmp, base=base)


def _fifo_config(tmp: Path) -> list[str]:
    d = _ckpt(tmp / "ex_a", _sd(1))
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    return merge_args(tmp, experts={"a": d})


def _weights_are_a_directory(tmp: Path) -> list[str]:
    d = tmp / "ex_a"
    (d / "model.safetensors").mkdir(parents=True)
    return merge_args(tmp, experts={"a": d})


def _weights_are_a_device(tmp: Path) -> list[str]:
    d = tmp / "ex_a"
    d.mkdir()
    (d / "model.safetensors").symlink_to("/dev/zero")
    return merge_args(tmp, experts={"a": d})


def _deep_header(tmp: Path) -> list[str]:
    depth = 200_000
    _raw_safetensors(
        tmp / "ex_a" / "model.safetensors", b'{"w":' + b"[" * depth + b"]" * depth + b"}"
    )
    return merge_args(tmp, experts={"a": tmp / "ex_a"})


def _config(tmp: Path, raw: bytes) -> list[str]:
    d = _ckpt(tmp / "ex_a", _sd(1))
    (d / "config.json").write_bytes(raw)
    return merge_args(tmp, experts={"a": d})


def _index(tmp: Path, raw: bytes) -> list[str]:
    d = _ckpt(tmp / "ex_a", _sd(1))
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_bytes(raw)
    return merge_args(tmp, experts={"a": d})


def _lone_shard(tmp: Path) -> list[str]:
    d = _ckpt(tmp / "ex_a", _sd(1))  # a sharded upload cut short: shard 1 of 2, no index yet
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    return merge_args(tmp, experts={"a": d})


def _s3_expert(tmp: Path, options: str) -> list[str]:
    return [*merge_args(tmp, experts={"a": "s3://bucket/ex_a"}), "--storage-options", options]


NO_AWS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}
DUMMY_AWS = {**NO_AWS, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}

ROWS = [
    Row(
        "out-existing-directory",
        _existing_dir,
        "already exists and is not empty (thesis.tex): pass --force to replace it",
    ),
    Row(
        "out-existing-file",
        _existing_file,
        "is an existing file: pass --force to replace it with the new directory",
    ),
    Row("out-previous-merge", _previous_merge, "already exists and is not empty"),
    Row(
        "out-s3-bucket-without-prefix",
        lambda t: _out(merge_args(t), "s3://bucket"),
        "--out s3://bucket: name a prefix inside the bucket, e.g. s3://bucket/merged",
    ),
    Row("out-inside-base", _out_inside_base, "is inside the base"),
    Row("fifo-weights", _fifo_weights, "model.safetensors: not a regular file (a FIFO)"),
    Row("fifo-weights-file", _fifo_weights_file, "a.safetensors: not a regular file (a FIFO)"),
    Row("fifo-side-file", _fifo_side_file, "tokenizer.json: not a regular file (a FIFO)"),
    Row("fifo-config", _fifo_config, "config.json: not a regular file (a FIFO)"),
    Row(
        "weights-are-a-directory",
        _weights_are_a_directory,
        "model.safetensors: not a regular file (a directory)",
    ),
    Row(
        "weights-are-a-device",
        _weights_are_a_device,
        "model.safetensors: not a regular file (a character device)",
    ),
    Row("header-nested-200k-deep", _deep_header, "header nests deeper than 16 levels"),
    Row("config-json-list", lambda t: _config(t, b"[1, 2]"), "config.json: not a JSON object"),
    Row(
        "config-not-utf8",
        lambda t: _config(t, b'{"model_type": "caf\xe9"}'),
        "config.json: not UTF-8",
    ),
    Row(
        "index-not-utf8",
        lambda t: _index(t, b'{"weight_map": {"caf\xe9": "x"}}'),
        "model.safetensors.index.json: not UTF-8",
    ),
    Row(
        "index-weight-map-list",
        lambda t: _index(t, b'{"weight_map": ["enc.w"]}'),
        "'weight_map' must map tensor names to shard file names",
    ),
    Row(
        "index-weight-map-path",
        lambda t: _index(t, b'{"weight_map": {"enc.w": "../../x.safetensors"}}'),
        "'weight_map' must map tensor names to shard file names",
    ),
    Row(
        "lone-shard-without-index",
        _lone_shard,
        "no model.safetensors or model.safetensors.index.json found",
    ),
    Row(
        "workers-negative",
        lambda t: [*merge_args(t), "--workers", "-1"],
        "--workers: must be 0 or more (got -1)",
    ),
    Row(
        "storage-options-unknown-key",
        lambda t: _s3_expert(t, json.dumps({"endpoint": "http://127.0.0.1:9"})),
        "--storage-options: s3 does not accept 'endpoint'",
        DUMMY_AWS,
    ),
    Row(
        "s3-input-no-credentials",
        lambda t: _s3_expert(t, DEAD_ENDPOINT),
        "no S3 credentials for s3://bucket/ex_a at http://127.0.0.1:9",
        NO_AWS,
    ),
    Row(
        "s3-input-endpoint-unreachable",
        lambda t: _s3_expert(t, DEAD_ENDPOINT),
        "S3 endpoint unreachable for s3://bucket/ex_a at http://127.0.0.1:9",
        DUMMY_AWS,
    ),
]


def _snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` -> its bytes (regular files) or its file type (anything else)."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = p.read_bytes() if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
    return out


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (interrupts a blocked open)."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_rows_have_unique_ids():
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_merge_refuses(row: Row, tmp_path, monkeypatch):
    from mergeflow.cli import app

    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    monkeypatch.setenv("COLUMNS", "400")
    for k, v in (row.env or {}).items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    if row.env:  # filesystems are cached per options; a cached one keeps old credentials
        import fsspec

        fsspec.get_filesystem_class("s3").clear_instance_cache()
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    args = row.setup(work)
    before = _snapshot(work)
    with _deadline(DEADLINE_S):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    _one_message(res.output, row.expect)
    assert _snapshot(work) == before, "the merge changed files"


def test_force_replaces_an_existing_directory_and_file(tmp_path, monkeypatch):
    from mergeflow.cli import app

    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    for setup in (_existing_dir, _existing_file):
        args = [*setup(tmp_path), "--force"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        out = Path(args[args.index("--out") + 1])
        assert (out / "model.safetensors").is_file() and not (out / "thesis.tex").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
