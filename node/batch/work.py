"""What a worker process does with one file: read, match, compress, write, replace.

The per-instance work is the daemon's: :func:`node.rules.first_match` picks the rule,
:func:`node.codecs.compress_dataset` encodes (bit-exact lossless with the same UID,
lossy marked as the daemon marks it, ``verify`` with an independent decoder) and
:func:`node.part10.part10_chunks` encodes the file. What differs is where it goes:

- in place, the new file is written beside the original under a temp name
  (:func:`node.batch.walk.temp_name`), given the original's mode and owner, fsync'ed,
  checked if asked, renamed over the original and the folder fsync'ed. At every
  moment the path holds either the untouched original or the complete new file;
- with ``--output``, the same way below the output folder (files left as they are
  are copied, so that the output tree is complete).

Like the daemon's workers, each worker compresses one file while its writer threads
write out the ones before it (their fsyncs mostly wait for the disk).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import queue
import signal
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, MediaStorageDirectoryStorage

from node.allocator import keep_large_buffers
from node.batch.options import Mode, WorkSettings, with_verify
from node.batch.walk import temp_name
from node.codecs import compress_dataset
from node.destinations import folder
from node.destinations.folder import FolderDestination, UnsafePathError
from node.fsutil import fsync_dir, makedirs_durably
from node.part10 import part10_chunks
from node.rules import Origin, first_match

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
WRITER_THREADS = 2
# Files this large are written by the worker itself, so that its memory stays that of
# about one of them (a 1 GB multi-frame: the file, its pixels and the encoded output).
WRITE_ALONE_BYTES = 64 * 1024 * 1024
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = 0x7FE00010
ITEM_TAG_VALUE = 0xE000FFFE  # (FFFE,E000) read as one little-endian 32-bit number
COPY_BLOCK = 1 << 20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# How compress_dataset words a failed verification (it keeps the input and says why).
_VERIFY_FAILED = ("failed verification", "does not decode to the input")


class Status(Enum):
    DONE = "done"  # the compressed file replaced the original (or was written to --output)
    KEPT = "kept"  # a DICOM file left as it is, with the reason
    SKIPPED = "skipped"  # not a file to compress (not DICOM, a DICOMDIR...)
    FAILED = "failed"  # an error; the original is untouched


@dataclass(frozen=True)
class Job:
    index: int
    path: str
    output: str | None  # where the result goes with --output
    size: int
    mtime_ns: int


@dataclass
class FileResult:
    index: int
    path: str
    status: Status = Status.FAILED
    reason: str = ""
    modality: str = ""
    syntax_before: str = ""
    syntax_after: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    size: int = 0  # of the file at `path` afterwards (for the journal)
    mtime_ns: int = 0
    seconds: float = 0.0
    disk_full: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class _Write:
    """A file compressed (or to be copied), still to be written."""

    result: FileResult
    job: Job
    chunks: Iterable[bytes]
    original: os.stat_result
    started: float
    target: Path | None = None  # None: in place; else the file to write with --output


# --------------------------------------------------------------------------- process


def worker_main(settings: WorkSettings, conn: Connection) -> None:
    """A worker process: jobs from ``conn`` until None; ``("start"|"done", ...)`` back.

    One connection per worker, written synchronously (a multiprocessing Queue's feeder
    thread could lose the last messages of a worker that is killed), so the main
    process always knows which files a worker holds.
    """
    _init_process()
    sending = threading.Lock()  # the main thread and the writer threads all reply

    def send(message: object) -> None:
        with sending:
            conn.send(message)

    writes: queue.Queue[_Write | None] = queue.Queue(maxsize=1)
    writers = [
        threading.Thread(target=_write_loop, args=(writes, send), daemon=True)
        for _ in range(WRITER_THREADS)
    ]
    for thread in writers:
        thread.start()
    try:
        while True:
            try:
                job: Job | None = conn.recv()
            except EOFError:
                return
            if job is None:
                return
            send(("start", job.index))
            prepared = prepare(settings, job)
            if isinstance(prepared, FileResult):
                send(("done", prepared))
            elif prepared.result.bytes_before >= WRITE_ALONE_BYTES:
                # Written before the next file is read: a worker holds one such file at a
                # time, not one per writer thread as well.
                send(("done", finish(prepared)))
            else:
                writes.put(prepared)
            del prepared
    finally:
        for _ in writers:
            writes.put(None)
        for thread in writers:
            thread.join()


def _init_process() -> None:
    """Die with the main process (kill -9 included); leave Ctrl-C to it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The main process stops feeding work on Ctrl-C or SIGTERM and lets each worker
    # finish the files in hand, so that nothing is left half done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_large_buffers()


def _write_loop(writes: queue.Queue[_Write | None], send: Callable[[object], None]) -> None:
    while (item := writes.get()) is not None:
        send(("done", finish(item)))
        del item


# --------------------------------------------------------------------------- one file


def prepare(settings: WorkSettings, job: Job) -> FileResult | _Write:
    """Read, match and compress one file: the result, or what is left to write."""
    started = time.perf_counter()
    result = FileResult(job.index, job.path, bytes_before=job.size)
    try:
        return _prepare(settings, job, result, started)
    except Exception as exc:  # a bug must cost one file, not the run
        result.status, result.reason = Status.FAILED, f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - started
        return result


def _prepare(
    settings: WorkSettings, job: Job, result: FileResult, started: float
) -> FileResult | _Write:
    path = Path(job.path)

    mirror = Path(job.output) if job.output else None

    def settle(status: Status, reason: str, target: Path | None = mirror) -> FileResult | _Write:
        result.status, result.reason = status, reason
        if settings.mode is Mode.OUTPUT and settings.layout and target is None:
            result.reason += " (not copied: --layout places DICOM files only)"
        copy = settings.mode is Mode.OUTPUT and not settings.dry_run and target is not None
        if copy and status in (Status.KEPT, Status.SKIPPED):  # the output tree gets it as it is
            return _Write(result, job, _file_blocks(path), st, started, target)
        result.size, result.mtime_ns = st.st_size, st.st_mtime_ns
        result.bytes_after = result.bytes_before
        result.seconds = time.perf_counter() - started
        return result

    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        result.reason = f"cannot stat: {exc.strerror or exc}"
        return result
    result.bytes_before = st.st_size
    try:
        # Whole, not deferred: a truncated file is found here, not halfway through encoding.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
        problem = _truncation(ds, [str(w.message) for w in caught])
    except InvalidDicomError:
        return settle(
            Status.SKIPPED, "not a DICOM file (no DICM prefix)", _unplaced(settings, mirror)
        )
    except OSError as exc:  # permission denied, I/O error
        result.reason = f"cannot read: {exc.strerror or exc}"
        return result
    except Exception as exc:  # pydicom's many ways of saying "broken"
        result.reason = (
            f"cannot be read as DICOM (truncated or damaged): {type(exc).__name__}: {exc}"
        )
        return result
    meta = ds.file_meta
    result.syntax_before = result.syntax_after = str(meta.get("TransferSyntaxUID", ""))
    result.modality = str(ds.get("Modality", "") or "")
    if problem is not None:
        result.reason = problem
        return result
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    if sop_class == MediaStorageDirectoryStorage:
        return settle(
            Status.SKIPPED,
            "a DICOMDIR not named DICOMDIR (left as it is)",
            _unplaced(settings, mirror),
        )
    if "SOPInstanceUID" not in ds:
        return settle(Status.KEPT, "no SOP Instance UID", _unplaced(settings, mirror))
    try:
        placed = _placed(settings, ds, mirror)  # before the encoder works on ds
    except UnsafePathError as exc:
        result.reason = str(exc)
        return result
    rule = first_match(settings.rules, ds, Origin())
    if rule is None:
        return settle(Status.KEPT, "no rule matched", placed)
    if rule.compress is None:
        return settle(Status.KEPT, f"rule {rule.name!r} does not compress", placed)
    if settings.mode is Mode.IN_PLACE and not st.st_mode & 0o222:
        return settle(Status.KEPT, "read-only file (no write permission bit); left as it is")
    compressed = compress_dataset(ds, with_verify(rule.compress, settings.verify), copy_input=False)
    del ds  # the encoder worked on it in place
    result.notes = list(compressed.notes)
    if compressed.reason is not None:
        if any(text in compressed.reason for text in _VERIFY_FAILED):
            result.reason = f"verification failed, original kept: {compressed.reason}"
            result.seconds = time.perf_counter() - started
            return result
        return settle(Status.KEPT, compressed.reason, placed)
    chunks = part10_chunks(compressed.dataset)
    size = sum(len(c) for c in chunks)
    if size >= st.st_size and not settings.keep_larger:
        return settle(
            Status.KEPT, f"compressed output not smaller ({size} >= {st.st_size} bytes)", placed
        )
    result.status, result.bytes_after = Status.DONE, size
    result.syntax_after = str(compressed.transfer_syntax)
    if settings.dry_run:
        result.size, result.mtime_ns = st.st_size, st.st_mtime_ns
        result.seconds = time.perf_counter() - started
        return result
    try:  # a lossy output's new UID names its file
        target = _placed(settings, compressed.dataset, mirror)
    except UnsafePathError as exc:
        result.status, result.reason = Status.FAILED, str(exc)
        return result
    if settings.verify:
        expected = (UID(compressed.transfer_syntax), str(compressed.dataset.SOPInstanceUID))
        return _Write(result, job, _CheckedChunks(chunks, expected), st, started, target)
    return _Write(result, job, chunks, st, started, target)


def _placed(settings: WorkSettings, ds: pydicom.Dataset, mirror: Path | None) -> Path | None:
    """Where ``ds`` goes with --output: its --layout path, or the same path as in the source."""
    if settings.output is None or not settings.layout:
        return mirror
    dest = FolderDestination(name="--output", path=settings.output, layout=settings.layout)
    return folder.target_path(dest, ds)


def _unplaced(settings: WorkSettings, mirror: Path | None) -> Path | None:
    """Where a file that is not an instance goes: nowhere with --layout."""
    return None if settings.layout else mirror


@dataclass
class _CheckedChunks:
    """Chunks whose written file is read back and checked before it replaces anything."""

    chunks: list[bytes]
    expected: tuple[UID, str]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)


def _truncation(ds: pydicom.Dataset, warned: list[str]) -> str | None:
    """Why ``ds`` looks cut short, or None: pydicom reads a truncated file without error."""
    if any("End of file reached" in text for text in warned):
        return "truncated: the file ends inside an element of undefined length"
    tags = sorted(ds.keys())
    if not tags:
        return "no data elements after the file meta information"
    last = ds.get_item(tags[-1])
    if isinstance(last, RawDataElement) and last.value is not None:
        if last.length != UNDEFINED_LENGTH and len(last.value) < last.length:
            return (
                f"truncated: {last.tag} declares {last.length} bytes, the file holds "
                f"{len(last.value)}"
            )
        if last.length == UNDEFINED_LENGTH and last.tag == PIXEL_DATA_TAG:
            return _encapsulation_problem(last.value)
    return None


def _encapsulation_problem(value: bytes) -> str | None:
    """Whether encapsulated Pixel Data's items add up (a cut inside an item does not)."""
    offset = 0
    while offset + 8 <= len(value):
        tag, length = struct.unpack_from("<LL", value, offset)
        if tag != ITEM_TAG_VALUE:
            return None  # a sequence delimiter or something unusual: leave it to the codecs
        offset += 8 + length
    if offset != len(value):
        return "truncated: the file ends inside a Pixel Data fragment"
    return None


def finish(item: _Write) -> FileResult:
    """Write ``item`` out; any error leaves the original (and the output) as they were."""
    result = item.result
    try:
        if item.target is not None:
            target = item.target
            makedirs_durably(target.parent)
            _write_replacing(target, item, check_unchanged=False)
            done = os.stat(item.job.path)  # the source, for the journal
        else:
            target = Path(item.job.path)
            _write_replacing(target, item, check_unchanged=True)
            done = os.stat(target)
        result.size, result.mtime_ns = done.st_size, done.st_mtime_ns
        if result.status is not Status.DONE:
            result.bytes_after = result.bytes_before
    except _Changed as exc:
        result.status, result.reason = Status.FAILED, str(exc)
    except OSError as exc:
        result.status = Status.FAILED
        result.disk_full = exc.errno in DISK_FULL
        what = "disk full" if result.disk_full else "cannot write"
        result.reason = f"{what} ({exc.strerror or exc}); original kept"
    except Exception as exc:
        result.status, result.reason = Status.FAILED, f"{type(exc).__name__}: {exc}; original kept"
    result.seconds = time.perf_counter() - item.started
    return result


class _Changed(Exception):
    """The original changed while it was compressed: it is left for the next run."""


def _write_replacing(target: Path, item: _Write, *, check_unchanged: bool) -> None:
    check = None
    if isinstance(item.chunks, _CheckedChunks):
        expected = item.chunks.expected

        def check(tmp: Path) -> None:
            _check_written(tmp, expected)

    replace_durably(
        target,
        item.chunks,
        like=item.original,
        strict_owner=check_unchanged,
        unchanged=item.original if check_unchanged else None,
        check=check,
    )


def replace_durably(
    target: Path,
    chunks: Iterable[bytes],
    *,
    like: os.stat_result,
    strict_owner: bool,
    unchanged: os.stat_result | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Put ``chunks`` at ``target`` whole or not at all: temp name beside it, fsync, rename.

    The new file gets the owner and mode of ``like`` (an error if ``strict_owner`` and
    the owner cannot be kept). ``check`` may refuse the written temp file; with
    ``unchanged``, a target that changed since it was stat'ed is not replaced.
    """
    tmp = temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            _keep_owner_and_mode(fd, like, strict=strict_owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        if check is not None:
            check(tmp)
        if unchanged is not None:
            now = os.stat(target, follow_symlinks=False)
            if (now.st_ino, now.st_size, now.st_mtime_ns) != (
                unchanged.st_ino,
                unchanged.st_size,
                unchanged.st_mtime_ns,
            ):
                raise _Changed("changed while it was being compressed; left for the next run")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _keep_owner_and_mode(fd: int, original: os.stat_result, *, strict: bool) -> None:
    """The new file gets the original's owner and mode (an error if in place and it cannot)."""
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (original.st_uid, original.st_gid):
        try:
            os.fchown(fd, original.st_uid, original.st_gid)
        except PermissionError:
            if strict:
                raise
    os.fchmod(fd, original.st_mode & 0o7777)


def _check_written(tmp: Path, expected: tuple[UID, str]) -> None:
    """The file on disk parses whole, with the syntax and UID that were verified in memory."""
    ds = pydicom.dcmread(tmp)
    got = (UID(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID))
    if got != expected or "PixelData" not in ds:
        raise ValueError(f"the written file reads back as {got}, not {expected}")


def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(COPY_BLOCK):
            yield block
