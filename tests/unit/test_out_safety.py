"""Outputs never destroy a user's files (issue 22): ``export-task``, ``lora-lego``, ``report``.

One row per case. A refusal row asserts exit status 2, exactly one ``error:`` line naming what to
fix, no traceback, and that the whole test directory — the user's files, the inputs, the parent
of ``--out`` — is byte-identical afterwards (so no temp file is left and nothing is half-written).
A ``--force`` row asserts exit status 0, that the user's file or directory was replaced by the
command's output, and that no temp file is left beside it. ``proc`` rows run the real
``mergeflow`` in a subprocess under a file-size limit (``ulimit -f``); ``ro`` rows make the
parent of ``--out`` unwritable (mode 555, or ``chattr +i`` as root, who may write anywhere else).
``docs/reliability.md`` lists these rows.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergeflow import compression, masks, tensors
from mergeflow.io import OutputError, atomic_dir, save_state_dict
from tests.unit.test_bad_inputs import CONFIG, _adapter, _one_message

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------- builders


def _archive(tmp: Path) -> tuple[Path, Path]:
    """A TALL archive of 2 tasks referencing its base by sha256, and that base model dir."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    tvs = {t: {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "ab"}
    mtl = tensors.sum_all(list(tvs.values()))
    packed, meta = masks.pack_masks(masks.tall_masks_from_vectors(tvs, 0.4, mtl=mtl))
    bdir = tmp / "base"
    bdir.mkdir(parents=True)
    save_state_dict(base, bdir / "model.safetensors")
    (bdir / "config.json").write_text('{"model_type": "bert"}')
    (bdir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    save_state_dict(packed, tmp / "masks.safetensors", metadata=meta)
    heads = {t: {"classifier.weight": torch.ones(2, 4)} for t in tvs}
    configs = {t: {**CONFIG, "hidden_size": 4} for t in tvs}
    arc = tmp / "arc"
    compression.write_archive(
        arc,
        bdir / "model.safetensors",
        mtl,
        tmp / "masks.safetensors",
        heads,
        configs,
        include_base=False,
    )
    (tmp / "masks.safetensors").unlink()
    return arc, bdir


def _export(tmp: Path, out: Path | str, *extra: str) -> list[str]:
    arc, bdir = _archive(tmp)
    return [
        "export-task",
        "--archive",
        str(arc),
        "--task",
        "a",
        "--base",
        str(bdir),
        "--out",
        str(out),
        *extra,
    ]


def _lego(tmp: Path, out: Path | str, *extra: str, ads: Path | None = None) -> list[str]:
    ads = ads or tmp / "adapters"
    a, b = _adapter(ads / "ad1"), _adapter(ads / "ad2")
    return ["lora-lego", str(a), str(b), "--rank", "2", "--out", str(out), *extra]


def _report(tmp: Path, out: Path | str, *extra: str) -> list[str]:
    (tmp / "ws").mkdir(exist_ok=True)
    return ["report", "--root", str(tmp / "ws"), "--out", str(out), *extra]


def _user_dir(p: Path) -> Path:
    """A directory of the user's files (one hidden, one nested)."""
    (p / "notes").mkdir(parents=True)
    (p / "thesis.tex").write_text("\\section{Results}\n")
    (p / ".config").write_text("keep=1\n")
    (p / "notes" / "todo.md").write_text("- back up\n")
    return p


def _user_file(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"the user's only copy\n")
    return p


# ------------------------------------------------------------------------------------ rows


@dataclass
class Row:
    """One case: ``setup(tmp)`` builds the files and returns the ``mergeflow`` argv.

    ``kind``: ``cli`` (CliRunner, cwd ``tmp/cwd``), ``ro`` (the same while ``tmp/ro`` cannot be
    written), ``fsize`` (a subprocess under ``ulimit -f`` of ``limit`` bytes).
    ``expect``: a substring of the one ``error:`` line; ``None`` for a ``--force`` row, which
    must succeed and replace ``replaced`` (relative to ``tmp``) with a dir holding ``made``.
    """

    id: str
    setup: Callable[[Path], list[str]]
    expect: str | None
    kind: str = "cli"
    replaced: str = ""
    made: str = ""
    limit: int = 0
    marks: list = field(default_factory=list)


SLOW = [pytest.mark.slow]

ROWS = [
    # export-task: out versus its inputs
    Row("export-out-is-the-base", lambda t: _export(t, t / "base"), "would replace the base"),
    Row("export-out-is-the-archive", lambda t: _export(t, t / "arc"), "would replace the archive"),
    Row(
        "export-out-holds-the-inputs",
        lambda t: _export(t / "w", t / "w"),
        "would replace the archive",
    ),
    Row(
        "export-out-inside-the-archive",
        lambda t: _export(t, t / "arc" / "t_a"),
        "is inside the archive",
    ),
    # export-task: existing outputs
    Row(
        "export-out-existing-dir",
        lambda t: _export(t, _user_dir(t / "mine")),
        "already exists and is not empty",
    ),
    Row(
        "export-out-existing-file",
        lambda t: _export(t, _user_file(t / "mine.txt")),
        "is an existing file: pass --force",
    ),
    Row(
        "export-out-current-dir",
        lambda t: _user_dir(t / "cwd") and _export(t, "."),
        "is the current directory",
    ),
    Row(
        "export-out-under-a-file",
        lambda t: _export(t, _user_file(t / "mine.txt") / "x"),
        "is a file, not a directory",
    ),
    # lora-lego
    Row(
        "lego-out-is-an-input",
        lambda t: _lego(t, t / "adapters" / "ad1"),
        "would replace an input adapter",
    ),
    Row(
        "lego-out-holds-the-inputs",
        lambda t: _lego(t, t / "adapters"),
        "would replace an input adapter",
    ),
    Row(
        "lego-out-existing-dir",
        lambda t: _lego(t, _user_dir(t / "mine")),
        "already exists and is not empty",
    ),
    Row(
        "lego-out-existing-file",
        lambda t: _lego(t, _user_file(t / "mine.txt")),
        "is an existing file: pass --force",
    ),
    # report
    Row(
        "report-out-existing-dir",
        lambda t: _report(t, _user_dir(t / "mine")),
        "is a directory; this writes a file: name it, e.g. --out",
    ),
    Row(
        "report-out-existing-file",
        lambda t: _report(t, _user_file(t / "mine.html")),
        "is an existing file: pass --force",
    ),
    Row(
        "report-figures-is-a-file",
        lambda t: _report(t, t / "page.html", "--figures", str(_user_file(t / "figs"))),
        "is a file: give a directory for the charts",
    ),
    # the operating system refuses the write
    Row(
        "export-read-only-parent",
        lambda t: _export(t, t / "ro" / "out"),
        "no permission to write in",
        kind="ro",
    ),
    Row(
        "lego-read-only-parent",
        lambda t: _lego(t, t / "ro" / "out"),
        "no permission to write in",
        kind="ro",
    ),
    Row(
        "export-file-size-limit",
        lambda t: _export(t, t / "out"),
        "file-size limit (ulimit -f",
        kind="fsize",
        limit=64,
        marks=SLOW,
    ),
    Row(
        "report-file-size-limit",
        lambda t: _report(t, t / "page.html"),
        "file-size limit (ulimit -f",
        kind="fsize",
        limit=1024,
        marks=SLOW,
    ),
    # --force replaces, atomically
    Row(
        "export-force-existing-dir",
        lambda t: _export(t, _user_dir(t / "mine"), "--force"),
        None,
        replaced="mine",
        made="model.safetensors",
    ),
    Row(
        "export-force-existing-file",
        lambda t: _export(t, _user_file(t / "mine.txt"), "--force"),
        None,
        replaced="mine.txt",
        made="model.safetensors",
    ),
    Row(
        "lego-force-existing-dir",
        lambda t: _lego(t, _user_dir(t / "mine"), "--force"),
        None,
        replaced="mine",
        made="adapter_model.safetensors",
    ),
    Row(
        "report-force-existing-file",
        lambda t: _report(t, _user_file(t / "mine.html"), "--force"),
        None,
        replaced="mine.html",
    ),
]


# --------------------------------------------------------------------------------- helpers


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` (hidden ones too) -> its bytes, ``<dir>`` or its link."""
    snap: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        d = Path(dirpath)
        for n in dirs:
            p = d / n
            snap[str(p.relative_to(root))] = f"-> {os.readlink(p)}" if p.is_symlink() else "<dir>"
        for n in files:
            p = d / n
            snap[str(p.relative_to(root))] = p.read_bytes()
    return snap


def _no_temp_beside(path: Path) -> None:
    left = [n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.")]
    assert not left, f"temp files left beside {path}: {left}"


@contextlib.contextmanager
def _read_only(d: Path) -> Iterator[None]:
    """Make directory ``d`` unwritable for this process: mode 555, or immutable for root."""
    if os.geteuid() != 0:
        os.chmod(d, 0o555)
        undo = ["chmod", "755", str(d)]
    else:  # root writes into a 555 directory; an immutable one (chattr +i) it cannot
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode:
            pytest.skip("running as root without chattr +i: cannot make a directory unwritable")
        undo = ["chattr", "-i", str(d)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def _run_cli(argv: list[str]) -> tuple[int, str]:
    from mergeflow.cli import app

    res = CliRunner().invoke(app, argv)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def _run_limited(argv: list[str], limit: int, cwd: Path) -> tuple[int, str]:
    """``mergeflow argv`` in a subprocess whose files may not grow past ``limit`` bytes."""
    env = {**os.environ, "COLUMNS": "400", "MERGEFLOW_TRACKING": "off"}
    p = subprocess.run(
        [str(BIN / "mergeflow"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    return p.returncode, p.stdout + p.stderr


# ----------------------------------------------------------------------------------- tests


def test_row_ids_are_unique_and_docs_list_every_row():
    import re

    assert len({r.id for r in ROWS}) == len(ROWS)
    doc = (ROOT / "docs" / "reliability.md").read_text()
    head = "### Outputs never replace a user's file (issue 22)"
    section = doc[doc.index(head) + len(head) :]
    section = section[: section.find("\n#")] if "\n#" in section else section
    listed = re.findall(r"^\| `out:([a-z0-9-]+)` \|", section, flags=re.M)
    assert listed == [r.id for r in ROWS] + ["atomic-dir-race"]
    for r in ROWS:  # the documented message contains what the row asserts
        line = next(x for x in section.splitlines() if x.startswith(f"| `out:{r.id}` |"))
        if r.expect is not None:
            assert r.expect in line.replace("`", ""), r.id


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_out_safety(row: Row, tmp_path: Path, monkeypatch):
    tmp = tmp_path
    (tmp / "cwd").mkdir()
    (tmp / "ro").mkdir()
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp / "cwd")
    argv = row.setup(tmp)
    before = _tree(tmp)
    if row.kind == "fsize":
        code, text = _run_limited(argv, row.limit, tmp / "cwd")
    elif row.kind == "ro":
        with _read_only(tmp / "ro"):
            code, text = _run_cli(argv)
    else:
        code, text = _run_cli(argv)
    if row.expect is None:
        assert code == 0, (code, text)
        target = tmp / row.replaced
        if row.made:  # the user's dir or file became the command's output dir
            assert target.is_dir() and (target / row.made).is_file()
            assert not (target / "thesis.tex").exists()
        else:
            assert b"<title>mergeflow dashboard</title>" in target.read_bytes()
        _no_temp_beside(target)
        return
    assert code == 2, (code, text)
    _one_message(text, row.expect)
    assert _tree(tmp) == before, "files changed or temp files left"


def test_an_earlier_report_is_replaced_without_force(tmp_path, monkeypatch):
    """The rule's exception: a page ``report`` wrote before is its own to replace."""
    from mergeflow.cli import app

    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    argv = _report(tmp_path, tmp_path / "page.html")
    assert CliRunner().invoke(app, argv).exit_code == 0
    (tmp_path / "page.html").write_text(
        (tmp_path / "page.html").read_text().replace("</body>", "old</body>")
    )
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert "old</body>" not in (tmp_path / "page.html").read_text()


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "no-replace"])
def test_atomic_dir_race_two_writers_to_one_new_out(tmp_path, monkeypatch, replace):
    """20 trials: two threads build the same new ``out`` and reach the swap together.

    With ``replace`` both succeed (the later swaps its result in); without it the later one is
    refused with an :class:`OutputError` and the first one's result is kept. Either way ``out``
    holds one writer's complete result and no temp dir is left.
    """
    real_rename, real_replace = os.rename, os.replace
    for trial in range(20):
        out = tmp_path / f"t{trial}" / "out"
        both = threading.Barrier(2)

        def at_the_swap(real: Callable, out: Path = out, both: threading.Barrier = both):
            def call(src, dst, *a, **k):
                if Path(dst) == out:  # hold each writer until the other one is here too
                    try:
                        both.wait(timeout=5)
                    except threading.BrokenBarrierError:
                        pass
                return real(src, dst, *a, **k)

            return call

        monkeypatch.setattr(os, "rename", at_the_swap(real_rename))
        monkeypatch.setattr(os, "replace", at_the_swap(real_replace))
        errors: list[BaseException] = []

        def write(i: int, out: Path = out, errors: list = errors) -> None:
            try:
                with atomic_dir(out, **({} if replace else {"replace": False})) as d:
                    (d / "who").write_text(str(i))
                    (d / "part2").write_text(str(i))
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if replace:
            assert errors == [], errors
        else:
            assert len(errors) == 1 and isinstance(errors[0], OutputError), errors
            assert "another writer" in str(errors[0])
        assert sorted(os.listdir(out)) == ["part2", "who"]
        assert (out / "who").read_text() == (out / "part2").read_text()
        assert os.listdir(out.parent) == ["out"], os.listdir(out.parent)
