"""What a worker process does with one acknowledged instance: match, compress, hand over.

Runs in worker processes only (pixel work stays out of the network process). It
reports what it did as an :class:`Outcome`; the main process does the logging.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pydicom
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import UID

from node.allocator import keep_large_buffers, release_free_memory
from node.codecs import compress_dataset, passthrough
from node.codecs.base import CompressResult
from node.config import Config, DicomDestination, FolderDestination, Rule
from node.destinations import folder
from node.fsutil import link_or_copy_durably, makedirs_durably, write_durably
from node.rules import Origin, first_match
from node.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Spool,
    element_header,
)

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
DEFER_BYTES = 64 * 1024
WORKER_NICENESS = 15
READY = b"ready"
# After an instance this large a worker gives its freed memory back to the system.
LARGE_INSTANCE_BYTES = 16 * 1024 * 1024
PIXEL_DATA = 0x7FE00010
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
META_GROUP_LENGTH = 0x00020000
# What pydicom's writer would add or refuse when missing: version, SOP class and
# instance, transfer syntax, implementation class and version name.
_REQUIRED_META = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)
_TEXT_VRS = frozenset({"UI", "AE", "SH", "LO", "CS", "UR"})
_INT_FORMATS = {"US": "<H", "SS": "<h", "UL": "<L", "SL": "<l"}


@dataclass
class Outcome:
    """What happened to one incoming file; logged by the main process."""

    incoming: str
    status: str  # delivered | unrouted | quarantined
    sop_instance_uid: str = ""
    rule: str = ""
    transfer_syntax: str = ""
    compressed: bool = False
    lossy: bool = False
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    delivered: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)  # pending in a destination's outbox
    errors: list[str] = field(default_factory=list)


@dataclass
class Reply:
    """A worker's answer to one job: the outcome, or the error that stopped it."""

    outcome: Outcome | None = None
    error: str | None = None
    os_error: bool = False  # disk full, I/O error: the instance is fine, the disk is not
    traceback: str = ""


@dataclass
class Prepared:
    """An instance routed and compressed, still to be written to its destinations.

    A worker's writer threads do this part (durable writes, links, fsyncs: mostly
    waiting for the disk) while the worker compresses the next instance.
    """

    outcome: Outcome
    write: Callable[[], None]
    started: float

    def finish(self) -> Outcome:
        self.write()
        self.outcome.seconds = time.perf_counter() - self.started
        return self.outcome


# What a worker runs per instance: (config, path of the incoming file) -> the outcome,
# or the prepared instance that gives it once written.
Task = Callable[[Config, str], "Outcome | Prepared"]
# A worker's messages to the node: (FREE, path): it may be sent the next instance while
# its writer threads write this one; (DONE, path, Reply): this one is settled.
FREE = "free"
DONE = "done"


def main() -> None:
    """Entry point of a worker process: ``<socket fd> <node pid> <module:task>``.

    The node starts its workers with :mod:`subprocess`, not :mod:`multiprocessing`,
    whose spawn method also starts a resource tracker process (15 MB) that the node
    has no use for.
    """
    fd, parent_pid, task_name = sys.argv[1:4]
    module, _, name = task_name.partition(":")
    task: Task = getattr(importlib.import_module(module), name)
    serve(Connection(int(fd)), task, int(parent_pid))


def serve(conn: Connection, task: Task, parent_pid: int) -> None:
    """A worker process's main loop: one job at a time from its socket, replies back.

    A job is ``(pickled config, path)``; the config is unpickled again only when it
    changed (a reload). The loop ends when the node closes its end.
    """
    init_worker(parent_pid)
    sending = threading.Lock()  # the main thread and the writer threads all reply

    def send(message: object) -> None:
        data = message if isinstance(message, bytes) else pickle.dumps(message)
        with sending:
            conn.send_bytes(data)

    send(READY)
    writer = _Writer(send)
    config: tuple[bytes, Config] | None = None
    try:
        while True:
            try:
                blob, path_text = pickle.loads(conn.recv_bytes())
            except EOFError:
                return
            if config is None or config[0] != blob:
                config = (blob, pickle.loads(blob))
            _handle(task, config[1], path_text, writer, send)
    finally:
        writer.close()


def _handle(
    task: Task, config: Config, path_text: str, writer: _Writer, send: Callable[[object], None]
) -> None:
    # A function of its own, so that nothing of this instance (data set, pixel data)
    # stays referenced while the next one is compressed.
    result = _run(task, config, path_text)
    if isinstance(result, Prepared):
        writer.take(path_text, result)
    else:
        send((DONE, path_text, result))


class _Writer:
    """The threads that write a worker's instances out.

    While they wait for fsyncs the worker compresses the next instance, so the core is
    not left idle (measured on 2 cores: 14-18 % of both cores idle with one worker per
    core, the node fed as fast as it can). Two of them, because one instance's writing
    (two fsyncs, each a journal commit) took longer than compressing the next: the
    worker waited 1.4-2.3 ms per instance for a single writer; fsyncs from two threads
    share journal commits. Large instances are written alone, before the next one is
    taken, so a worker's memory stays that of about one of them.
    """

    THREADS = 2

    def __init__(self, send: Callable[[object], None]) -> None:
        self._send = send
        self._jobs: queue.Queue[tuple[str, Prepared] | None] = queue.Queue()
        self._free = threading.Semaphore(self.THREADS)
        self._threads = [
            threading.Thread(target=self._loop, name="writer", daemon=True)
            for _ in range(self.THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def take(self, path_text: str, prepared: Prepared) -> None:
        """Write ``prepared`` out; return once the worker may take the next instance."""
        if prepared.outcome.bytes_in >= LARGE_INSTANCE_BYTES:
            self._jobs.join()  # every instance before it is written
            self._free.acquire()
            self._jobs.put((path_text, prepared))
            self._jobs.join()
            return
        self._free.acquire()  # a writer is free for it
        # Said before a writer starts, so the node always hears FREE before DONE.
        self._send((FREE, path_text))
        self._jobs.put((path_text, prepared))

    def close(self) -> None:
        self._jobs.join()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            path_text, prepared = job
            del job  # the instance's memory goes with ``prepared``, below
            reply = _finish(prepared)
            del prepared
            self._send((DONE, path_text, reply))
            if reply.outcome is not None and reply.outcome.bytes_in >= LARGE_INSTANCE_BYTES:
                release_free_memory()
            self._free.release()
            self._jobs.task_done()
        self._jobs.task_done()


def _run(task: Task, config: Config, path_text: str) -> Reply | Prepared:
    try:
        result = task(config, path_text)
    except Exception as exc:
        return _error_reply(exc)
    return result if isinstance(result, Prepared) else Reply(outcome=result)


def _finish(prepared: Prepared) -> Reply:
    try:
        return Reply(outcome=prepared.finish())
    except Exception as exc:
        return _error_reply(exc)


def _error_reply(exc: Exception) -> Reply:
    if isinstance(exc, OSError):  # disk full, I/O error: the instance is fine
        return Reply(error=str(exc), os_error=True)
    # A bug in our code: the node keeps the file and says so.
    return Reply(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def init_worker(parent_pid: int) -> None:
    """Worker initializer: die with the node, and yield the CPU to its receiving side.

    The worker must end when the node process ends, however it ends. Its pipe tells an
    idle worker, but a busy one would finish a large instance first, for nobody.
    (PDEATHSIG follows the thread that started the worker; the pipeline starts workers
    from its main and dispatcher threads, which live as long as the node.)
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: watch the parent instead
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the node died before prctl took effect
        os._exit(1)
    # Ctrl-C and a SIGTERM to the whole process group are for the node to handle: it
    # lets the workers finish the instance in hand, then stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Below the receiving process in the scheduler: on a busy machine the C-STORE
    # answers come first and the spool absorbs the compression backlog.
    os.nice(WORKER_NICENESS)  # also the lowest best-effort I/O priority
    run_only_on_idle_cpu()
    keep_large_buffers()


def run_only_on_idle_cpu() -> bool:
    """SCHED_IDLE: this process gets a CPU only when nothing else wants it.

    At nice 15 a worker still takes its slice from the thread answering C-STOREs and
    from the sender: timed C-STOREs during a JPEG-LS run, 5 pairs of 200 CT, p99
    13.0-16.5 ms at nice 15, 12.4-14.2 ms at SCHED_IDLE (receive-only: about 10.5),
    with the same compression rate (6 pairs, medians 140 and 137 img/s). The price: on
    a machine that other programs keep fully busy, compression waits and the spool
    grows. False where the platform has no SCHED_IDLE (nice 15 stays).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def prepare_incoming(config: Config, path_text: str) -> Outcome | Prepared:
    """Read, route and compress one file of ``incoming/``; what is left is writing it.

    Returns the outcome itself when there is nothing to write (the file was gone, is
    unreadable, or no rule matched it).
    """
    started = time.perf_counter()
    path = Path(path_text)
    spool = Spool(config.node.spool)
    outcome = Outcome(incoming=path.name, status="delivered", bytes_in=_size(path))
    if not path.exists():
        # Already handled (a crash between delivery and unlink, then a re-scan).
        outcome.status = "gone"
        return outcome
    try:
        # Large values (Pixel Data) are read only if a codec asks for them.
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        ds.SOPInstanceUID  # noqa: B018 - a data set without it cannot be routed or stored
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError, KeyError) as exc:
        reason = f"cannot be read as DICOM: {type(exc).__name__}: {exc}"
        spool.keep_aside(path, spool.quarantine, reason)
        outcome.status, outcome.reason = "quarantined", reason
        return outcome
    outcome.sop_instance_uid = str(ds.SOPInstanceUID)
    origin = Origin.from_file_meta(ds.file_meta)
    rule = first_match(config.rules, ds, origin)
    if rule is None:
        reason = (
            f"no rule matched (Modality={ds.get('Modality', '')!r}, "
            f"calling AE {origin.calling_ae_title!r}, peer {origin.peer_address})"
        )
        spool.keep_aside(path, spool.unrouted, reason)
        outcome.status, outcome.reason = "unrouted", reason
        return outcome
    outcome.rule = rule.name
    if rule.compress is None:
        # Sent as received: the spool file is already a valid Part 10 file, so it is
        # linked (or copied) to the destinations as it is, without re-encoding.
        outcome.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        return Prepared(
            outcome,
            lambda: _hand_over(config, spool, rule, ds, path, outcome, received=True),
            started,
        )
    result = _apply_rule(rule, ds, path)
    outcome.transfer_syntax = str(result.transfer_syntax)
    outcome.compressed, outcome.lossy = result.compressed, result.lossy
    outcome.reason, outcome.notes = result.reason, list(result.notes)
    outcome.sop_instance_uid = str(result.dataset.SOPInstanceUID)
    return Prepared(
        outcome, lambda: _hand_over(config, spool, rule, result.dataset, path, outcome), started
    )


def _apply_rule(rule: Rule, ds: Dataset, path: Path) -> CompressResult:
    assert rule.compress is not None
    # The worker owns ds: no defensive copy. A pass-through may find ds half-changed,
    # so it starts again from the file, which is still in incoming/.
    result = compress_dataset(ds, rule.compress, copy_input=False)
    if result.reason is not None:
        kept = passthrough(pydicom.dcmread(path), result.reason)
        kept.notes = result.notes
        return kept
    return result


def _hand_over(
    config: Config,
    spool: Spool,
    rule: Rule,
    ds: Dataset,
    incoming: Path,
    outcome: Outcome,
    received: bool = False,
) -> None:
    """Give every destination its copy (written once, then linked), or queue it.

    The first copy goes straight to its final place, so a full spool does not stop
    delivery to an archive on another disk. An OSError here (disk full) leaves the
    incoming file in place; the pipeline tries again later.
    """
    chunks = [] if received else part10_chunks(ds)
    outcome.bytes_out = outcome.bytes_in if received else sum(len(c) for c in chunks)
    written: Path | None = incoming if received else None

    def put(path: Path) -> None:
        nonlocal written
        if written is None:
            write_durably(path, chunks)
            written = path
        else:
            link_or_copy_durably(written, path)

    for name in rule.send_to:
        dest = config.destinations[name]
        if isinstance(dest, FolderDestination):
            try:
                target = folder.target_path(dest, ds)
                makedirs_durably(target.parent)
                put(target)
                outcome.delivered.append(name)
                continue
            except (OSError, folder.UnsafePathError) as exc:
                outcome.errors.append(f"{name}: {exc}; queued for retry")
        elif not isinstance(dest, DicomDestination) and dest.type != "dicomweb":  # issue 17
            raise TypeError(f"unknown destination type {type(dest).__name__}")
        pending = spool.pending_dir(name)
        makedirs_durably(pending)
        put(pending / incoming.name)
        outcome.queued.append(name)
    # Every destination has it or holds it in its outbox: the incoming copy can go.
    incoming.unlink()


def encode_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file with the node's own implementation identity."""
    return b"".join(part10_chunks(ds))


def part10_chunks(ds: Dataset) -> list[bytes]:
    """:func:`encode_part10` in pieces, so that a large Pixel Data value is written
    to the file as it is, not copied into the encoded data set first."""
    meta = ds.file_meta if isinstance(ds.file_meta, FileMetaDataset) else FileMetaDataset()
    identity = {
        "MediaStorageSOPClassUID": ds.SOPClassUID,
        "MediaStorageSOPInstanceUID": ds.SOPInstanceUID,
        "ImplementationClassUID": IMPLEMENTATION_CLASS_UID,
        "ImplementationVersionName": IMPLEMENTATION_VERSION_NAME,
    }
    for keyword, value in identity.items():
        if meta.get(keyword) != value:  # a UID set is validated: 20 µs, usually for nothing
            setattr(meta, keyword, value)
    ds.file_meta = meta
    if _raw_elements_reusable(ds):
        return _encode_explicit_little(ds)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return [buffer.getvalue()]


def _raw_elements_reusable(ds: Dataset) -> bool:
    """True if the elements still as read can be copied byte for byte into the output.

    That holds when input and output are both Explicit VR Little Endian (encapsulated
    syntaxes included, deflated excepted) and the character set did not change.
    """
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    return (
        ds.original_encoding == (False, True)
        and ds.original_character_set == ds._character_set
        and not syntax.is_implicit_VR
        and syntax.is_little_endian
        and not syntax.is_deflated
    )


def _encode_explicit_little(ds: Dataset) -> list[bytes]:
    """What ``save_as`` writes, a few times faster: elements still as read are copied.

    pydicom spends about 20 µs per element on bookkeeping; an image has 50-100 of
    them, and this runs once per instance in every worker.
    """
    chunks: list[bytes] = []
    fp = _little_explicit_buffer()
    preamble = getattr(ds, "preamble", None)
    fp.write((preamble if preamble and len(preamble) == 128 else bytes(128)) + b"DICM")
    meta = _file_meta_bytes(ds.file_meta)
    if meta is None:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    else:
        fp.write(meta)
    charset = ds.get("SpecificCharacterSet", default_encoding)
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths, as pydicom's writer drops them
        elem = ds.get_item(tag)
        if _copyable(elem):
            fp.write(element_header(tag, elem.VR, elem.length))
            fp.write(elem.value)
        elif tag == PIXEL_DATA and _value_writable_as_is(ds[tag]):
            chunks += [fp.getvalue(), *_pixel_data_chunks(ds[tag])]
            fp = _little_explicit_buffer()
        elif not _undefined_length(elem) and (
            (data := _plain_value_bytes(elem.VR, elem.value)) is not None
        ):
            fp.write(element_header(tag, elem.VR, len(data)))
            fp.write(data)
        else:
            write_data_element(fp, ds[tag], charset)
    chunks.append(fp.getvalue())
    return chunks


def _file_meta_bytes(meta: FileMetaDataset) -> bytes | None:
    """What ``write_file_meta_info`` writes for ``meta``, or None if this cannot tell.

    pydicom validates and re-encodes every element (about 0.3 ms); the node's own
    file meta holds a handful of elements, still raw or plain text, that need neither.
    Anything unusual (a missing element pydicom would add, a value that is not plain
    ASCII text) is left to pydicom.
    """
    if any(tag not in meta or meta[tag].is_empty for tag in _REQUIRED_META):
        return None
    parts = []
    for tag in sorted(meta.keys()):
        if tag == META_GROUP_LENGTH:
            continue
        elem = meta.get_item(tag)
        if _copyable(elem):
            parts += [element_header(tag, elem.VR, elem.length), elem.value]
            continue
        data = None if _undefined_length(elem) else _plain_value_bytes(elem.VR, elem.value)
        if data is None:
            return None
        parts += [element_header(tag, elem.VR, len(data)), data]
    body = b"".join(parts)
    return element_header(META_GROUP_LENGTH, "UL", 4) + struct.pack("<L", len(body)) + body


def _plain_value_bytes(vr: str, value: Any) -> bytes | None:
    """The value as pydicom writes it, for the simple cases only (else None).

    One ASCII string of a text VR (the same bytes in every character set), one
    integer of a binary VR, or OB bytes: what routing and compression typically read
    or set (UIDs, Rows, Photometric Interpretation...), which pydicom re-encodes at
    about 20 µs an element.
    """
    if vr in _TEXT_VRS and isinstance(value, str) and value.isascii():
        data = value.encode()
        return data + (b"\x00" if vr == "UI" else b" ") if len(data) % 2 else data
    if vr in _INT_FORMATS and type(value) is int:
        try:
            return struct.pack(_INT_FORMATS[vr], value)
        except struct.error:  # out of range: let pydicom say so
            return None
    if vr == "OB" and isinstance(value, bytes):
        return value + b"\x00" if len(value) % 2 else value
    return None


def _undefined_length(elem: DataElement | RawDataElement) -> bool:
    if isinstance(elem, RawDataElement):
        return elem.length == 0xFFFFFFFF
    return elem.is_undefined_length


def _little_explicit_buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _value_writable_as_is(elem: DataElement) -> bool:
    """True if pydicom would write this Pixel Data value unchanged (no padding or check)."""
    value = elem.value
    return (
        elem.VR in ("OB", "OW")
        and isinstance(value, bytes)
        and len(value) % 2 == 0
        and (not elem.is_undefined_length or value.startswith(ITEM_TAG))
    )


def _pixel_data_chunks(elem: DataElement) -> list[bytes]:
    if elem.is_undefined_length:  # encapsulated: items, then the sequence delimiter
        return [element_header(PIXEL_DATA, elem.VR, 0xFFFFFFFF), elem.value, SEQUENCE_DELIMITER]
    return [element_header(PIXEL_DATA, elem.VR, len(elem.value)), elem.value]


def _copyable(elem: Any) -> bool:
    return (
        isinstance(elem, RawDataElement)
        and elem.value is not None  # not deferred
        and elem.VR not in (None, "SQ", "UN")
        and elem.length != 0xFFFFFFFF
        and len(elem.value) == elem.length
    )


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
