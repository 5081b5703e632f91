"""Durable file writes: temp name, fsync, rename, directory fsync."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, chunks: Iterable[bytes], *, sync_dir: bool = True) -> None:
    """Write ``chunks`` to ``path`` so that it exists whole or not at all, even after a crash.

    The data go to a temporary name in the same folder first; readers never see a
    partial file, and an old file at ``path`` is replaced atomically.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            for chunk in chunks:
                f.write(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def link_or_copy_durably(src: Path, dst: Path) -> None:
    """Give ``dst`` the content of ``src`` durably: a hard link where possible, else a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}{TMP_SUFFIX}")
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


def makedirs_durably(path: Path) -> None:
    """Create ``path`` and its parents, fsync'ing each new entry's parent."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)
