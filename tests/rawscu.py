"""A C-STORE SCU written at the byte level, for input no real sender would produce.

Real peers (DCMTK, pynetdicom) refuse to send invalid UIDs, a command whose UIDs
differ from its data set's, a deflate bomb or an even presentation context ID; this
client sends exactly the bytes it is given (PS3.8 9.3 PDUs, PS3.7 E command sets).
"""

from __future__ import annotations

import functools
import socket
import struct
import zlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.dataphase import STATUS, parse_command

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS = "1.2.840.10008.1.2.4.80"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
A_ASSOCIATE_AC = 0x02
A_ABORT = 0x07
P_DATA_TF = 0x04


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(
    called: bytes = b"TEST-NODE",
    calling: bytes = b"RAWSCU",
    contexts: list[tuple[int, str, str]] | None = None,
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ; ``contexts`` are (ID, abstract syntax, transfer syntax)."""
    contexts = contexts or [(1, CT_IMAGE_STORAGE, EXPLICIT_LE)]
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, transfer in contexts:
        items += _item(
            0x20,
            bytes([context_id, 0, 0, 0])
            + _item(0x30, abstract.encode())
            + _item(0x40, transfer.encode()),
        )
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None if the connection closed."""
    header = _read_exact(sock, 6)
    if header is None:
        return None
    kind, _, length = struct.unpack(">BBL", header)
    body = _read_exact(sock, length)
    return None if body is None else (kind, body)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


@dataclass
class Association:
    sock: socket.socket
    accepted: dict[int, bool]
    message_id: int = 0

    def close(self) -> None:
        try:
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
            read_pdu(self.sock)
        except OSError:
            pass
        self.sock.close()


def associate(
    port: int,
    contexts: list[tuple[int, str, str]] | None = None,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
) -> Association:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(contexts=contexts))
    reply = read_pdu(sock)
    if reply is None or reply[0] != A_ASSOCIATE_AC:
        sock.close()
        raise ConnectionError(f"association not accepted: {reply and reply[0]}")
    return Association(sock, _accepted_contexts(reply[1]))


def _accepted_contexts(body: bytes) -> dict[int, bool]:
    accepted, offset = {}, 68
    while offset + 4 <= len(body):
        kind, _, length = struct.unpack_from(">BBH", body, offset)
        if kind == 0x21:
            accepted[body[offset + 4]] = body[offset + 6] == 0
        offset += 4 + length
    return accepted


def command(sop_class: bytes, sop_instance: bytes, message_id: int) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), with whatever UIDs it is given."""

    def element(tag: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHL", 0, tag, len(value)) + value

    body = b"".join(
        [
            element(0x0002, sop_class),
            element(0x0100, struct.pack("<H", 0x0001)),
            element(0x0110, struct.pack("<H", message_id)),
            element(0x0700, struct.pack("<H", 0)),
            element(0x0800, struct.pack("<H", 0x0000)),
            element(0x1000, sop_instance),
        ]
    )
    return element(0x0000, struct.pack("<L", len(body))) + body


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", P_DATA_TF, 0, len(item)) + item


def c_store(
    assoc: Association,
    sop_class: bytes,
    sop_instance: bytes,
    dataset: bytes | list[bytes],
    context_id: int = 1,
    fragment: int = 16000,
) -> tuple[int, str] | None:
    """Send one C-STORE; the status and error comment, or None if the node aborted.

    ``dataset`` is the encoded data set, or its pieces (sent as they are, so that a
    large data set need not be held whole).
    """
    assoc.message_id = assoc.message_id % 0xFFFF + 1
    sock = assoc.sock
    try:
        sock.sendall(pdata(context_id, 0x03, command(sop_class, sop_instance, assoc.message_id)))
        pieces = [dataset] if isinstance(dataset, bytes) else dataset
        pending = b""
        for piece in pieces:
            pending += piece
            while len(pending) > fragment:
                sock.sendall(pdata(context_id, 0x00, pending[:fragment]))
                pending = pending[fragment:]
        sock.sendall(pdata(context_id, 0x02, pending))
    except OSError:
        return None
    raw = b""
    while True:  # the response's command set, from as many PDUs as it takes
        reply = read_pdu(sock)
        if reply is None or reply[0] != P_DATA_TF:
            return None
        raw += reply[1][6:]
        if reply[1][5] & 0x02:
            break
    fields = parse_command(raw)
    status = struct.unpack("<H", fields[STATUS])[0]
    comment = fields.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    return status, comment


def encode(ds: Dataset) -> bytes:
    """``ds`` as an Explicit VR Little Endian data set (no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def with_value(data: bytes, group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """Explicit VR LE ``data`` with one short-VR element's value replaced by raw bytes."""
    tag = struct.pack("<HH", group, element) + vr
    at = data.index(tag)
    (length,) = struct.unpack_from("<H", data, at + 6)
    if len(value) % 2:
        value += b"\x00"
    return data[:at] + tag + struct.pack("<H", len(value)) + value + data[at + 8 + length :]


def deflate(data: bytes) -> bytes:
    out = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return out.compress(data) + out.flush()


def deflate_bomb(header: bytes, inflated_size: int) -> list[bytes]:
    """``header`` (a data set without Pixel Data), then Pixel Data of ``inflated_size``
    zero bytes, deflated in pieces (the bomb is never held inflated).

    The header is deflated on its own and ends with a full flush (no back-references
    cross it), so the costly part is made once per size and shared by every bomb.
    """
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return [head.compress(header) + head.flush(zlib.Z_FULL_FLUSH), *_zero_pixels(inflated_size)]


@functools.lru_cache(maxsize=4)
def _zero_pixels(size: int) -> tuple[bytes, ...]:
    out = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pieces = [out.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size))]
    zeros = bytes(16 * 1024 * 1024)
    left = size
    while left:
        chunk = zeros[: min(left, len(zeros))]
        pieces.append(out.compress(chunk))
        left -= len(chunk)
    pieces.append(out.flush())
    return tuple(p for p in pieces if p)
