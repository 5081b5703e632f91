"""The files of the trees to compress, in a stable order.

Symbolic links are never followed (a link to a file inside the tree would reach it
twice, one outside would leave the tree); they are reported, like FIFOs and other
non-regular files. A temp file that an interrupted run left beside an original
(``.<name>.<pid>.dicom-node-compress.partial``) is removed here: the original
beside it is whole, since the temp file is renamed over it only once complete.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

TEMP_SUFFIX = ".dicom-node-compress.partial"
_TEMP_NAME = re.compile(r"^\..+\.\d+" + re.escape(TEMP_SUFFIX) + r"$")
DICOMDIR_NAME = "DICOMDIR"


def temp_name(path: Path) -> Path:
    """Where the new version of ``path`` is written before it replaces ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


@dataclass(frozen=True)
class Candidate:
    """A regular file to compress."""

    path: Path
    root: Path
    relative: str  # below its tree, with "/" separators; the file's own name for a file root
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """A path left alone, with the reason (not a failure)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Unlistable:
    """A folder that could not be read (a failure: files in it may be missed)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DicomDir:
    """A DICOMDIR file: not compressed; its records are brought up to date after the run."""

    path: Path
    root: Path
    relative: str


Entry = Candidate | Skipped | Unlistable | DicomDir


@dataclass(frozen=True)
class WalkFilter:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_age: float = 0.0  # seconds
    leave_out: tuple[Path, ...] = ()  # the output folder, the journal and its side files
    remove_stale: bool = True  # False in a dry run, which writes nothing

    def reason_to_skip(self, relative: str, mtime_ns: int, now: float) -> str | None:
        if self.include and not any(fnmatchcase(relative, g) for g in self.include):
            return "not matched by --include"
        if any(fnmatchcase(relative, g) for g in self.exclude):
            return "matched by --exclude"
        if self.min_age and now - mtime_ns / 1e9 < self.min_age:
            return f"modified less than {self.min_age:g} s ago (--min-age)"
        return None


@dataclass
class WalkCounts:
    stale_temp_removed: int = 0


def walk(roots: tuple[Path, ...], flt: WalkFilter, counts: WalkCounts) -> Iterator[Entry]:
    """Every file below ``roots`` (sorted by path), once each, even if the trees overlap."""
    now = time.time()
    seen: set[Path] = set()
    for root in roots:
        if root.is_dir():
            entries = _walk_dir(root, root, flt, counts, now)
        else:
            entries = _entry(root, root.parent, flt, counts, now)
        for entry in entries:
            if entry.path not in seen:
                seen.add(entry.path)
                yield entry


def remove_stale_temp_files(folder: Path) -> int:
    """Remove the temp files a killed run left in an output tree; how many there were."""
    removed = 0
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            if _TEMP_NAME.match(name):
                Path(parent, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _walk_dir(
    root: Path, folder: Path, flt: WalkFilter, counts: WalkCounts, now: float
) -> Iterator[Entry]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield Unlistable(folder, f"cannot list folder: {exc.strerror or exc}")
        return
    for entry in entries:
        path = Path(entry.path)
        if path in flt.leave_out:
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_dir(root, path, flt, counts, now)
        else:
            yield from _entry(path, root, flt, counts, now)


def _entry(
    path: Path, base: Path, flt: WalkFilter, counts: WalkCounts, now: float
) -> Iterator[Entry]:
    if path in flt.leave_out:
        return
    try:
        st = path.lstat()
    except OSError as exc:
        yield Skipped(path, f"cannot stat: {exc.strerror or exc}")
        return
    if stat.S_ISLNK(st.st_mode):
        yield Skipped(path, "symbolic link (not followed)")
        return
    if not stat.S_ISREG(st.st_mode):
        yield Skipped(path, "not a regular file")
        return
    if _TEMP_NAME.match(path.name):
        # Left by a run that was killed; the original beside it is whole.
        if flt.remove_stale:
            path.unlink(missing_ok=True)
            counts.stale_temp_removed += 1
        return
    relative = path.relative_to(base).as_posix()
    if path.name == DICOMDIR_NAME:
        yield DicomDir(path, base, relative)
        return
    reason = flt.reason_to_skip(relative, st.st_mtime_ns, now)
    if reason is not None:
        yield Skipped(path, reason)
        return
    yield Candidate(path, base, relative, st.st_size, st.st_mtime_ns)
