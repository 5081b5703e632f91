"""Durable file writes: temp name, fsync, rename, directory fsync."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".partial"
# Errors that the same write will meet again however often it is retried: a name the
# file system refuses (too long, bytes it does not take).
PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})


def is_permanent(exc: OSError) -> bool:
    """True if retrying the operation that raised ``exc`` cannot succeed."""
    return exc.errno in PERMANENT_ERRNOS


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableFile:
    """A file that appears at its path whole, and durably, or not at all.

    The data go to a temporary name in the same folder; :meth:`commit` fsyncs it and
    renames it into place (replacing an old file atomically); :meth:`discard` drops it.
    Used for a data set streamed in as it arrives from the network.
    """

    def __init__(self, path: Path, tmp: Path | None = None) -> None:
        # ``path`` may still change before commit (a file created ahead of its data).
        self.path = path
        self._tmp = tmp or _tmp_name(path)
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "write after commit or discard"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def write_all(self, chunks: Iterable[bytes]) -> None:
        """Write every chunk; on any error the temp file is dropped and the error raised."""
        try:
            for chunk in chunks:
                self.write(chunk)
        except BaseException:
            self.discard()
            raise

    def commit(self, *, sync_dir: bool = True) -> Path:
        assert self._fd is not None, "commit after commit or discard"
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        if sync_dir:
            fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _unlink_quietly(self._tmp)


def write_durably(path: Path, chunks: Iterable[bytes], *, sync_dir: bool = True) -> None:
    """Write ``chunks`` to ``path`` so that it exists whole or not at all, even after a crash."""
    file = DurableFile(path)
    file.write_all(chunks)
    file.commit(sync_dir=sync_dir)


def link_or_copy_durably(src: Path, dst: Path) -> None:
    """Give ``dst`` the content of ``src`` durably: a hard link where possible, else a copy."""
    tmp = _tmp_name(dst)
    _unlink_quietly(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        # Another file system, or links not allowed: copy instead.
        with open(src, "rb") as f:
            write_durably(dst, iter(lambda: f.read(1 << 20), b""))
        return
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


# A worker's writer threads create directories at once. One at a time, so that no
# thread finds a directory whose entry another thread has not fsync'ed yet.
_CREATING_DIRECTORIES = threading.Lock()


def makedirs_durably(path: Path) -> None:
    """Create ``path`` and its parents, fsync'ing each new entry's parent.

    A directory that another process creates at the same moment (FileExistsError)
    gets its parent fsync'ed here too: what the caller writes into it next must not
    depend on the other process having got that far.
    """
    with _CREATING_DIRECTORIES:
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            fsync_dir(d.parent)


def _tmp_name(path: Path) -> Path:
    # Unique per thread: two threads of a process may write the same file (the same
    # instance received twice) at once.
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_native_id()}{TMP_SUFFIX}")


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)
