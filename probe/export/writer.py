"""The atomic writer: an export appears whole where the user expects it, or not at all.

Output goes to a hidden temporary file (or directory, for a partitioned dataset) in the
target's own directory, and is renamed over the target only once complete and synced
to disk; a failure, Ctrl-C or SIGTERM removes the temporary. An existing target is
never replaced without ``force``: without it the final step is a hard link, which fails
if someone created the target meanwhile (no check-then-write race).

>>> with atomic_file(Path("out.csv"), force=False) as f:
...     f.write(b"...")
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class OutputError(OSError):
    """The output cannot be created or written; the message names the path."""

    def __init__(self, message: str, *, exists: bool = False, create: bool = True) -> None:
        super().__init__(message)
        self.exists = exists
        #: True when it could not be created (exit 73), False when writing failed (74)
        self.create = create


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_target(path: Path, *, force: bool) -> None:
    """Fail early, before anything is read: an existing target without ``force``, a
    missing or unwritable directory."""
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputError(f"{path} exists: use --force to replace it", exists=True)
        if path.is_dir() and not path.is_symlink() and not _is_dataset(path):
            raise OutputError(f"{path} is a directory that is not a Vantage dataset: "
                              "not replacing it")  # fmt: skip
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {path}: {parent} is not writable")


def _is_dataset(path: Path) -> bool:
    """A directory an earlier ``--partition-by`` export wrote: only ``key=value``
    directories and Parquet files inside."""
    for entry in path.rglob("*"):
        if entry.is_dir() and "=" not in entry.name:
            return False
        if entry.is_file() and entry.suffix != ".parquet":
            return False
    return True


def _temporary_name(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_file(path: Path, *, force: bool) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` when the block ends without an exception."""
    check_target(path, force=force)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_name(path), suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {_why(exc)}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                if isinstance(exc, OutputError):
                    raise
                raise OutputError(f"cannot write {path}: {_why(exc)}", create=False) from exc
        os.chmod(tmp, 0o644 & ~_umask())
        _publish(tmp, path, force=force)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: Path, *, force: bool) -> Iterator[Path]:
    """A directory that becomes ``path`` (a dataset) when the block ends without error."""
    check_target(path, force=force)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(path), suffix=".tmp", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {_why(exc)}") from exc
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o755 & ~_umask())
        try:
            _sync_tree(tmp)  # the files' contents reach the disk before the name does
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {_why(exc)}", create=False) from exc
        if path.exists():  # force (checked above): keep the old one until the new is in
            old = Path(tempfile.mkdtemp(prefix=_temporary_name(path), suffix=".old", dir=parent))
            os.rename(path, old / "dataset")
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if old is not None:
                os.rename(old / "dataset", path)
            raise OutputError(f"cannot create {path}: {_why(exc)}") from exc
        _sync_directory(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (a dataset about to be renamed in)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_directory(Path(folder))


def _publish(tmp: Path, path: Path, *, force: bool) -> None:
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the target appeared meanwhile: never clobber
    except FileExistsError as exc:
        raise OutputError(f"{path} exists: use --force to replace it", exists=True) from exc
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EXDEV) and not force:
            # a filesystem without hard links: rename, after one more check
            if path.exists():
                raise OutputError(f"{path} exists: use --force to replace it",
                                  exists=True) from exc  # fmt: skip
            os.replace(tmp, path)
        else:
            raise OutputError(f"cannot create {path}: {_why(exc)}") from exc
    _sync_directory(path.parent if str(path.parent) else Path("."))


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def standard_output() -> Iterator[BinaryIO]:
    """Standard output as a binary stream (``--out -``)."""
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()
