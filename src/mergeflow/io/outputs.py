"""Outputs that never destroy a user's files: checks before writing, and clear write errors.

Every command that writes a directory or a file checks its output path first with
:func:`check_out` (before any work, so a refusal costs nothing): an output never replaces one of
the command's inputs, a directory holding one, the current directory, or an existing non-empty
directory or file unless the user passed ``--force``. :func:`write_error` turns the operating
system's refusals while writing (file-size limit, disk full, read-only or forbidden directory)
into one message naming what to fix; :func:`~mergeflow.io.atomic_dir` applies it, so nothing is
ever left half-written.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mergeflow.tensors import MergeError


class OutputError(MergeError):
    """An output path that would destroy a user's files, or that cannot be written.

    A :class:`~mergeflow.tensors.MergeError` (a ``ValueError``), so every command and stage that
    reports bad input as one ``error:`` line reports this one too.
    """


def check_out(
    out: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None]
    | Iterable[tuple[str, str | os.PathLike | None]]
    | None = None,
    *,
    force: bool = False,
    flag: str = "--out",
    file_name: str | None = None,
) -> None:
    """Refuse an output path that would destroy a user's files or cannot be written.

    Call it before any work. Object-store URLs (``scheme://``) are left to their writer.

    Args:
        out: The output path (a directory, or a file when ``file_name`` is given).
        inputs: Label (e.g. ``"the base"``) -> an input path of the command, as a mapping or
            as pairs (None paths are skipped). ``out`` may be none of them, no directory
            holding one, and not inside an input directory.
        force: Replace an existing non-empty directory or an existing file.
        flag: The option that named ``out``, used in messages.
        file_name: ``out`` is a file, e.g. ``index.html``: an existing directory there is refused
            even with ``force`` (the message suggests ``<out>/<file_name>``).

    Raises:
        OutputError: ``out`` is the current directory or one of its parents, a mount point, an
            input, holds one or lies inside one, exists (non-empty) and ``force`` is not given,
            or its parent cannot be written (permission, read-only file system, not a directory).

    """
    if "://" in str(out):
        return
    path = Path(out)
    o = path.resolve()
    here = Path.cwd()
    if o in (here, *here.parents) or os.path.ismount(o):
        raise OutputError(
            f"{flag} {out} is the current directory, one of its parents or a mount point, which "
            "cannot be replaced: choose a new output path"
        )
    pairs = inputs.items() if isinstance(inputs, Mapping) else (inputs or ())
    for label, p in pairs:
        if p is None or "://" in str(p):
            continue
        q = Path(p).resolve()
        if o == q or o in q.parents:
            raise OutputError(
                f"{flag} {out} would replace {label} ({p}): choose an output path outside the "
                "inputs"
            )
        if q.is_dir() and q in o.parents:
            raise OutputError(
                f"{flag} {out} is inside {label} ({p}): choose an output path outside the inputs"
            )
    _check_existing(path, force, flag, file_name)
    _check_parent_writable(path, flag)


def _check_existing(path: Path, force: bool, flag: str, file_name: str | None) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        if file_name is not None:
            raise OutputError(
                f"{flag} {path} is a directory; this writes a file: name it, e.g. "
                f"{flag} {path / file_name}"
            )
        found = sorted(os.listdir(path))
        if found and not force:
            raise OutputError(exists_message(flag, path, found))
        return
    if not force:
        kind = "symbolic link" if path.is_symlink() else "file"
        what = "the new file" if file_name is not None else "the new directory"
        raise OutputError(
            f"{flag} {path} is an existing {kind}: pass --force to replace it with {what}, or "
            "choose a new output path"
        )


def exists_message(flag: str, out: str | os.PathLike, found: Sequence[str]) -> str:
    """The refusal for an existing, non-empty output directory (naming a few of its files)."""
    shown = ", ".join(found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (
        f"{flag} {out} already exists and is not empty ({shown}{more}): pass --force to "
        "replace it, or choose a new output path"
    )


def _check_parent_writable(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory this process can write."""
    anc = path.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(
            f"{flag} {path}: {anc} is a file, not a directory: choose an output path in a directory"
        )
    if _read_only_fs(anc):
        raise OutputError(
            f"{flag} {path}: {anc} is on a read-only file system: choose an output path on a "
            "writable one"
        )
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(
            f"{flag} {path}: no permission to write in {anc}: choose an output path in a "
            "directory you can write, or fix its permissions"
        )


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _fsize_limit() -> str:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return ""
    return "" if soft == resource.RLIM_INFINITY else f", now {soft} bytes"


def write_error(
    err: OSError, out: str | os.PathLike, within: str | os.PathLike | None = None
) -> OutputError | None:
    """The clear message for an ``OSError`` met while writing ``out``; None if it is not one.

    File-size limit, disk full / quota, read-only file system, a busy path, a name too long are
    write errors wherever they come from; permission errors only on ``out``, a directory made
    for it, its temp name or a path inside ``within`` (reading an input can be forbidden too).

    Args:
        err: The error.
        out: The output being written.
        within: The temp directory being filled, if any.

    Returns:
        An :class:`OutputError` naming what to fix, or None for other errors.

    """
    out = Path(out)
    where = out.absolute().parent
    code = err.errno
    if code == errno.EFBIG:
        fix = (
            f"a file exceeds this process's file-size limit (ulimit -f{_fsize_limit()}): raise "
            "it (ulimit -f unlimited) and rerun"
        )
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = f"no space left on the device (or quota exceeded) of {where}: free space or choose "
        fix += "another output path"
    elif code == errno.EROFS:
        fix = f"{where} is on a read-only file system: choose an output path on a writable one"
    elif code == errno.EBUSY:
        fix = "the path is in use (the current directory or a mount point): choose a new one"
    elif code == errno.ENAMETOOLONG:
        fix = "its name is too long for the file system: choose a shorter output path"
    elif code in (errno.EACCES, errno.EPERM) and _beside(err.filename, out, within):
        fix = (
            f"no permission to write in {where}: choose an output path in a directory you can "
            "write, or fix its permissions"
        )
    else:
        return None
    return OutputError(f"cannot write {out}: {fix}")


def _beside(filename: object, out: Path, within: str | os.PathLike | None) -> bool:
    """Whether ``filename`` is ``out``, a directory made for it, its temp name or inside ``within``."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    f = Path(os.fsdecode(filename)).absolute()
    o = out.absolute()
    if f == o or f in o.parents or (f.parent == o.parent and f.name.startswith(f".{o.name}.")):
        return True
    return within is not None and Path(within).absolute() in (f, *f.parents)
