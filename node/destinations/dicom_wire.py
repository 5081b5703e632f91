"""The data phase of the node's own C-STORE associations, on the socket: the sending
mirror of node/dataphase.py.

pynetdicom negotiates the association (A-ASSOCIATE, roles, extended negotiation);
then its threads let go of the socket (:func:`node.pynetdicom_private.take_over_socket`)
and :class:`WireAssociation` writes each C-STORE request (command set from a byte
template, data set straight from the outbox file in P-DATA-TF PDUs of the peer's
maximum length, PS3.8 9.3.5 and PS3.7 E), reads the response off the socket, and
releases. One thread per association, one reused buffer, no pydicom Dataset and never
more than one PDU of a file in memory; while a response is awaited the kernel is asked
to read the next file (posix_fadvise), so reading overlaps the peer's work.

Why: pynetdicom hands every PDU to its DUL thread through a queue and a state-machine
step, and each response waits for two polling threads; the sending side ran at about
a tenth of DCMTK's storescu (issue 15, docs/decisions.md). Not used over TLS (the
same code would work, but it is not tested there) nor with Storage Commitment (the
N-ACTION and reports go through pynetdicom on the same association).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from pathlib import Path
from typing import BinaryIO

from node.dataphase import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    ERROR_COMMENT,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED_TO,
    P_DATA_TF,
    STATUS,
    command_set,
    parse_command,
    pdata_pdus,
)

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
PRIORITY = 0x0700
# As pynetdicom's send_c_store, which the node used before: priority LOW, and 0x0001
# for "a data set follows" (any value but 0x0101, PS3.7 E.1).
LOW = 0x0002
DATA_SET_PRESENT = 0x0001
A_RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_RELEASE_RP = 0x06
A_ABORT = 0x07
# With no limit from the peer (maximum length 0), data go out in PDUs of this size.
UNLIMITED_PDU = 1024 * 1024
# A response PDU longer than this is not a C-STORE-RSP.
MAX_RESPONSE_PDU = 1024 * 1024
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
HEADERS = _PDU_HEADER.size + _PDV_HEADER.size  # 12 bytes before each fragment


class NotAPart10File(Exception):
    """The file has no File Meta Information group length to find its data set by."""


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, ``DICM`` and
    the File Meta Information, whose group length (0002,0000) the node always writes."""
    with open(path, "rb") as file:
        head = file.read(144)
    if len(head) < 144 or head[128:136] != b"DICM\x02\x00\x00\x00" or head[136:138] != b"UL":
        raise NotAPart10File(f"{path.name}: no File Meta Information group length")
    (length,) = struct.unpack_from("<L", head, 140)
    return 144 + int(length)


def store_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), as pynetdicom encodes it."""
    return command_set(
        [
            (AFFECTED_SOP_CLASS, sop_class.encode("ascii")),
            (COMMAND_FIELD, struct.pack("<H", C_STORE_RQ)),
            (MESSAGE_ID, struct.pack("<H", message_id)),
            (PRIORITY, struct.pack("<H", LOW)),
            (DATA_SET_TYPE, struct.pack("<H", DATA_SET_PRESENT)),
            (AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii")),
        ]
    )


class WireAssociation:
    """An established association's data phase, once pynetdicom has let go of it.

    Every socket problem (a reset, a peer that stops reading or answering within
    ``timeout``, an A-ABORT) raises ConnectionError: the association is then unusable
    and has been closed.
    """

    def __init__(self, sock: socket.socket, peer_max_pdu: int, timeout: float) -> None:
        room = (peer_max_pdu or UNLIMITED_PDU) - _PDV_HEADER.size
        if room < 1:
            raise ValueError(f"peer maximum PDU length {peer_max_pdu} leaves no room for data")
        self.sock = sock
        sock.settimeout(timeout)
        self.peer_max = peer_max_pdu
        self.room = room
        self._buffer = bytearray(HEADERS + room)
        self._message_id = 0
        self.open = True
        # The file to send next: the disk starts reading it while a response is awaited.
        self.read_ahead: Path | None = None

    # ------------------------------------------------------------------ requests

    def store_file(
        self, context_id: int, sop_class: str, sop_instance: str, path: Path
    ) -> tuple[int, str]:
        """C-STORE the data set of the Part 10 file at ``path``, as it is on disk.

        Returns (status, error comment). OSError if the file cannot be read (before
        anything is sent; a file that fails mid-way breaks the association).
        """
        offset = dataset_offset(path)
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size - offset
            if size < 0:
                raise NotAPart10File(f"{path.name}: shorter than its file meta")
            file.seek(offset)
            message_id = self._send_command(context_id, sop_class, sop_instance)
            try:
                self._send_file(context_id, file, size)
            except OSError as exc:  # the file failed half-way: the stream is broken
                self.abort()
                raise ConnectionError(f"reading {path.name} failed mid-instance: {exc}") from exc
        self._start_reading_ahead()
        return self._response(message_id)

    def _start_reading_ahead(self) -> None:
        """Ask the kernel to read the next file while the peer stores this one."""
        path, self.read_ahead = self.read_ahead, None
        if path is None:
            return
        with contextlib.suppress(OSError, AttributeError):  # no posix_fadvise: no matter
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def store_bytes(
        self, context_id: int, sop_class: str, sop_instance: str, data: bytes
    ) -> tuple[int, str]:
        """C-STORE an encoded data set (a decompressed or re-encoded instance)."""
        message_id = self._send_command(context_id, sop_class, sop_instance)
        view = memoryview(data)
        for start in range(0, max(len(data), 1), self.room):
            chunk = view[start : start + self.room]
            last = start + self.room >= len(data)
            header = _PDU_HEADER.pack(P_DATA_TF, 0, _PDV_HEADER.size + len(chunk))
            header += _PDV_HEADER.pack(len(chunk) + 2, context_id, 0x02 if last else 0x00)
            self._sendall(header + bytes(chunk))
        return self._response(message_id)

    def _send_command(self, context_id: int, sop_class: str, sop_instance: str) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        command = store_command(sop_class, sop_instance, self._message_id)
        self._sendall(pdata_pdus(context_id, command, self.peer_max))
        return self._message_id

    def _send_file(self, context_id: int, file: BinaryIO, size: int) -> None:
        view = memoryview(self._buffer)
        left = size
        while True:
            n = min(self.room, left)
            if _read_into(file, view[HEADERS : HEADERS + n]) < n:
                raise OSError("the file shrank while it was being sent")
            left -= n
            _PDU_HEADER.pack_into(self._buffer, 0, P_DATA_TF, 0, _PDV_HEADER.size + n)
            control = 0x00 if left else 0x02  # a data set fragment; 0x02: the last one
            _PDV_HEADER.pack_into(self._buffer, _PDU_HEADER.size, n + 2, context_id, control)
            self._sendall(view[: HEADERS + n])
            if not left:
                return

    # ------------------------------------------------------------------ responses

    def _response(self, message_id: int) -> tuple[int, str]:
        """Read the C-STORE-RSP to ``message_id`` off the socket: (status, comment)."""
        raw = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type != P_DATA_TF:
                self.abort()
                what = "aborted the association" if pdu_type == A_ABORT else f"sent PDU {pdu_type}"
                raise ConnectionError(f"the peer {what} instead of answering the C-STORE")
            last = self._gather_command(body, raw)
            if last:
                break
        fields = parse_command(bytes(raw))
        command = struct.unpack("<H", fields.get(COMMAND_FIELD, b"\0\0"))[0]
        responded_to = struct.unpack("<H", fields.get(MESSAGE_ID_RESPONDED_TO, b"\0\0"))[0]
        if command != C_STORE_RSP or responded_to != message_id or STATUS not in fields:
            self.abort()
            raise ConnectionError(
                f"unexpected DIMSE message 0x{command:04X} (to message {responded_to}) "
                f"instead of the C-STORE-RSP to message {message_id}"
            )
        comment = fields.get(ERROR_COMMENT, b"").rstrip(b"\0 ").decode("ascii", "replace")
        return struct.unpack("<H", fields[STATUS])[0], comment

    def _gather_command(self, body: bytes, raw: bytearray) -> bool:
        """Add a P-DATA-TF's command fragments to ``raw``; True after the last one."""
        offset, last = 0, False
        while offset + 6 <= len(body):
            (length,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            if length < 2 or offset + 4 + length > len(body):
                self.abort()
                raise ConnectionError("malformed presentation data value item from the peer")
            if control & 0x01:  # a command fragment; a response carries no data set
                raw += body[offset + 6 : offset + 4 + length]
                last = last or bool(control & 0x02)
            offset += 4 + length
        return last

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._read_exact(6)
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if length > MAX_RESPONSE_PDU:
            self.abort()
            raise ConnectionError(f"a PDU of {length} bytes from the peer")
        return pdu_type, self._read_exact(length)

    def _read_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except OSError as exc:  # a timeout too: no answer within the destination's
                self.close()
                raise ConnectionError(f"no answer: {exc}") from exc
            if not chunk:
                self.close()
                raise ConnectionError("the peer closed the connection")
            data += chunk
        return bytes(data)

    # ------------------------------------------------------------------ the end

    def release(self) -> bool:
        """A-RELEASE (PS3.8 7.2); True if the peer confirmed it. The socket is closed."""
        try:
            self._sendall(A_RELEASE_RQ_PDU)
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type == A_RELEASE_RP:
                    return True
                if pdu_type == A_ABORT:
                    return False
        except ConnectionError:
            return False
        finally:
            self.close()

    def abort(self) -> None:
        """A-ABORT (source: service user), then close; from any thread."""
        if self.open:
            with contextlib.suppress(OSError):
                self.sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        self.close()

    def close(self) -> None:
        self.open = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _sendall(self, data: bytes | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:  # a peer that stops reading: the socket's timeout
            self.close()
            raise ConnectionError(f"cannot send: {exc}") from exc


def _read_into(file: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        k = file.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            break
        got += k
    return got
