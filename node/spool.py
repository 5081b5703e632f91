"""The durable queue on disk between the network and the workers.

Layout below the spool root::

    incoming/<id>.dcm                  acknowledged to the sender, not yet routed
    unrouted/<id>.dcm + <id>.txt       matched no rule (kept, with the reason)
    quarantine/<id>.dcm + <id>.txt     could not be read or processed (kept, with the reason)
    destinations/<name>/pending/<id>.dcm (+ <id>.json)   waiting for (re)delivery
    destinations/<name>/failed/<id>.dcm + <id>.json      given up on, with the reason
    .lock                              flock'ed by the node that owns the spool; holds its PID

An ``<id>`` sorts in arrival order. A file in ``incoming/`` is removed only after
every destination of its rule has the result or holds it in its ``pending/`` folder.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import SpoolError
from node.fsutil import TMP_SUFFIX, DurableFile, fsync_dir, makedirs_durably, write_durably

PREAMBLE = b"\x00" * 128 + b"DICM"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1497.1"
IMPLEMENTATION_VERSION_NAME = "DICOM_NODE_010"
LOCK_NAME = ".lock"
# VRs whose explicit VR header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


@dataclass(frozen=True)
class Arrival:
    """What the association said about an instance; kept in its file meta."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    peer_port: int

    @classmethod
    def on(
        cls, assoc: Any, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> Arrival:
        """An instance received on pynetdicom association ``assoc`` (we are its acceptor)."""
        requestor = assoc.requestor
        return cls(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae_title=requestor.ae_title,
            called_ae_title=assoc.acceptor.ae_title,
            peer_address=str(requestor.address),
            peer_port=int(requestor.port or 0),
        )


class SpoolLock:
    """The running node's claim on its spool: an ``flock`` on ``<spool>/.lock``.

    Two nodes on one spool would each take the other's instances, and the second one's
    :meth:`Spool.create` would delete the first one's writes in progress. The lock is
    held for the node's lifetime and the kernel drops it however the process ends
    (kill -9 included), so a stale PID in the file never blocks a restart. The file
    descriptor is close-on-exec: worker processes do not inherit the lock.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`SpoolError` naming the PID that holds it."""
        try:
            makedirs_durably(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SpoolError(
                f"spool {self.path.parent}: cannot create its lock file "
                f"({exc.strerror or exc}); check node.spool and the folder's owner"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise SpoolError(
                f"spool {self.path.parent} is in use by another dicom-node "
                f"(PID {holder or 'unknown'}, holding {self.path}); stop it first, or give "
                "this one another node.spool"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else ""


class Spool:
    """The spool folder; one instance per process."""

    def __init__(self, root: Path, min_free: int = 0) -> None:
        self.root = root
        # Room kept free for the workers (their outboxes live here too).
        self.min_free = min_free
        self.incoming = root / "incoming"
        self.unrouted = root / "unrouted"
        self.quarantine = root / "quarantine"
        self.destinations = root / "destinations"
        self._counter = itertools.count()

    def create(self) -> None:
        """Create the folders; raise :class:`SpoolError` if the spool is not usable."""
        try:
            for folder in (self.incoming, self.unrouted, self.quarantine, self.destinations):
                makedirs_durably(folder)
            probe = self.incoming / f".probe-{os.getpid()}"
            write_durably(probe, [b"ok"])
            probe.unlink()
        except OSError as exc:
            raise SpoolError(
                f"spool {self.root}: not writable ({exc.strerror or exc}); "
                "check node.spool and the folder's owner"
            ) from exc
        self._remove_partial_writes()

    def pending_dir(self, destination: str) -> Path:
        return self.destinations / destination / "pending"

    def failed_dir(self, destination: str) -> Path:
        return self.destinations / destination / "failed"

    def new_id(self) -> str:
        # Time first so that names sort in arrival order; pid and counter make it unique.
        return f"{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}"

    def accept(self, arrival: Arrival, dataset: Iterable[bytes]) -> Path:
        """Store a received data set durably in ``incoming/``; return its path.

        Raises OSError (disk full, permission): the caller answers Out of Resources.
        """
        file = self.begin(arrival)
        file.write_all(dataset)
        return file.commit()

    def begin(self, arrival: Arrival, ahead: DurableFile | None = None) -> DurableFile:
        """A file in ``incoming/`` to stream a data set into as it arrives.

        It holds the preamble and file meta already; it is in ``incoming/`` (and so
        queued) only after :meth:`DurableFile.commit`. ``ahead`` is a file from
        :meth:`create_ahead` to use (it is discarded if this fails). Raises OSError
        like :meth:`accept`.
        """
        path = self.incoming / f"{self.new_id()}.dcm"
        try:
            self._check_room()
            if ahead is None:
                ahead = DurableFile(path)
        except OSError:
            if ahead is not None:
                ahead.discard()
            raise
        ahead.path = path
        ahead.write_all([PREAMBLE, encode_file_meta(arrival)])
        return ahead

    def create_ahead(self) -> DurableFile:
        """An empty temp file in ``incoming/`` for the next instance, before it arrives.

        Creating a file can wait for a journal commit that another fsync started (a
        good part of the receiving thread's time: docs/decisions.md#d1); created while
        the peer prepares its next C-STORE, it costs no response time. A crash leaves it as a partial write, removed at start.
        """
        tmp = self.incoming / f".ahead-{os.getpid()}-{next(self._counter):06d}{TMP_SUFFIX}"
        return DurableFile(self.incoming / "unnamed.dcm", tmp=tmp)

    def _check_room(self) -> None:
        if not self.min_free:
            return
        stat = os.statvfs(self.incoming)
        if stat.f_bavail * stat.f_frsize < self.min_free:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: spool has less than node.min_free_space "
                f"({self.min_free} bytes) free",
            )

    def list_incoming(self) -> list[Path]:
        return sorted(p for p in self.incoming.glob("*.dcm") if not p.name.startswith("."))

    def keep_aside(self, path: Path, folder: Path, reason: str) -> Path:
        """Move ``path`` into ``unrouted/`` or ``quarantine/`` with a reason file beside it."""
        target = folder / path.name
        write_durably(target.with_suffix(".txt"), [reason.encode("utf-8") + b"\n"], sync_dir=False)
        os.replace(path, target)
        fsync_dir(folder)
        return target

    def _remove_partial_writes(self) -> None:
        """Drop temp files of writes a crash interrupted; they were never acknowledged."""
        for tmp in [
            *self.incoming.glob(f".*{TMP_SUFFIX}"),
            *self.destinations.glob(f"*/*/.*{TMP_SUFFIX}"),
        ]:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ file meta, by hand
# pydicom builds a Dataset for this on every C-STORE; the group is small and fixed,
# and encoding it directly keeps the receive path free of per-instance pydicom work.


def encode_file_meta(arrival: Arrival) -> bytes:
    """The File Meta Information group (explicit VR little endian) for a received instance."""
    body = b"".join(
        [
            _element(0x0001, "OB", b"\x00\x01"),
            _element(0x0002, "UI", _uid(arrival.sop_class_uid)),
            _element(0x0003, "UI", _uid(arrival.sop_instance_uid)),
            _element(0x0010, "UI", _uid(arrival.transfer_syntax_uid)),
            _element(0x0012, "UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, "SH", _text(IMPLEMENTATION_VERSION_NAME)),
            # Who sent it, to whom, from where (PS3.10 7.1): the rules match on these.
            _element(0x0017, "AE", _text(arrival.calling_ae_title)),
            _element(0x0018, "AE", _text(arrival.called_ae_title)),
            _element(0x0027, "UR", _text(f"dicom://{arrival.peer_address}:{arrival.peer_port}")),
        ]
    )
    group_length = _element(0x0000, "UL", struct.pack("<I", len(body)))
    return group_length + body


def _element(element: int, vr: str, value: bytes) -> bytes:
    return element_header(0x00020000 | element, vr, len(value)) + value


def element_header(tag: int, vr: str, length: int) -> bytes:
    """An explicit VR little endian element header (PS3.5 7.1.2)."""
    group, element = tag >> 16, tag & 0xFFFF
    if vr in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, length)
    return struct.pack("<HH2sH", group, element, vr.encode(), length)


def _uid(value: str) -> bytes:
    raw = value.strip("\x00 ").encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.strip().encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw
