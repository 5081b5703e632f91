"""What the receiving side checks before it acknowledges an instance.

Both receive paths (the fast data phase and pynetdicom's) call :func:`command_refusal`
when a C-STORE request arrives and :func:`dataset_refusal` on the start of its data
set. An instance that passes is safe to acknowledge: its identifying UIDs can name
files, and a deflated data set inflates within ``node.max_dataset_size``. What is
refused gets a status and an error comment, and never reaches the spool.

Decisions (docs/conformance.md, "What the node refuses at the door"):

- SOP Class, SOP Instance, Study and Series Instance UIDs, where present, must be
  valid UI values (PS3.5 9.1): digits and dots, at most 64 bytes, no empty
  component. Components with a leading zero are accepted: some modalities write
  them, and they are harmless. Trailing NUL or space padding is allowed.
- The data set's SOP Class and SOP Instance UID must equal the command's Affected
  SOP Class and Instance UID (PS3.4 B.2.3, PS3.7 9.3.1.1); a mismatch is refused
  with A900 "Data Set does not match SOP Class", as DCMTK's storescp does.
- A deflated data set is inflated as it arrives, in bounded chunks, only to count
  its size and read its header; past ``max_dataset_size`` it is refused with A700.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.filereader import read_dataset

from node.statuses import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
_CHECKED_UIDS = {
    SOP_CLASS_UID: "SOP Class UID",
    SOP_INSTANCE_UID: "SOP Instance UID",
    STUDY_INSTANCE_UID: "Study Instance UID",
    SERIES_INSTANCE_UID: "Series Instance UID",
}
UNDEFINED_LENGTH = 0xFFFFFFFF
UID_MAX_BYTES = 64
_UID = re.compile(rb"[0-9]+(?:\.[0-9]+)*")
# Explicit VR little endian element headers (PS3.5 7.1.2): 2-byte or 4-byte lengths.
_SHORT_LENGTH_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# Inflated bytes produced per zlib call: bounds the memory of a deflate bomb.
INFLATE_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Refusal:
    """A C-STORE answered with a failure: its status and error comment."""

    status: int
    comment: str


def uid_problem(raw: bytes, what: str) -> str | None:
    """Why ``raw`` is not a valid UI value (PS3.5 9.1), or None."""
    value = raw.rstrip(b"\x00 ")
    if not value:
        return f"{what} is empty"
    if len(value) > UID_MAX_BYTES:
        return f"{what} is {len(value)} bytes long, over 64"
    if not _UID.fullmatch(value):
        return f"{what} is not digits and dots"
    return None


def command_refusal(sop_class: bytes, sop_instance: bytes) -> Refusal | None:
    """A C-STORE request's Affected SOP Class/Instance UIDs must be valid UIDs."""
    problem = uid_problem(sop_class, "Affected SOP Class UID") or uid_problem(
        sop_instance, "Affected SOP Instance UID"
    )
    return Refusal(CANNOT_UNDERSTAND, problem) if problem else None


@dataclass
class HeaderUids:
    """The identifying UIDs found at the start of a data set (raw value bytes)."""

    found: dict[int, bytes]
    complete: bool  # the walk got past Series Instance UID: an absent UID is absent


def dataset_refusal(
    data: bytes, transfer_syntax: str, sop_class: str, sop_instance: str
) -> Refusal | None:
    """Why the start of a data set must not be acknowledged, or None.

    ``data`` is the data set as received, or its first bytes (64 KiB are enough for
    any sane header; deflated data sets are passed inflated, with
    ``transfer_syntax`` Explicit VR Little Endian). ``sop_class`` and
    ``sop_instance`` are the command's.
    """
    header = read_header_uids(data, transfer_syntax)
    if header is None:
        return Refusal(CANNOT_UNDERSTAND, "data set unreadable")
    uid = header.found.get(SOP_INSTANCE_UID)
    if uid is None or not uid.strip(b"\x00 "):
        return Refusal(CANNOT_UNDERSTAND, "data set has no SOP Instance UID")
    for tag, value in header.found.items():
        problem = uid_problem(value, _CHECKED_UIDS[tag])
        if problem:
            return Refusal(CANNOT_UNDERSTAND, problem)
    if _text(uid) != sop_instance:
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from command's")
    data_class = header.found.get(SOP_CLASS_UID)
    if data_class is not None and _text(data_class) != sop_class:
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from command's")
    return None


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii")


def read_header_uids(data: bytes, transfer_syntax: str) -> HeaderUids | None:
    """The UIDs of :data:`_CHECKED_UIDS` at the start of ``data``; None if unreadable."""
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    if transfer_syntax != EXPLICIT_VR_BIG_ENDIAN:
        plain = _walk_plain(data, implicit)
        if plain is not None:
            return plain
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    # pydicom for the unusual (undefined lengths, big endian, odd VRs). ``data`` may
    # be a prefix cut off inside the header: values are trusted only from a walk that
    # went past them (pydicom may hand out a cut-off value at the end). If the walk
    # cannot reach past the Series UID, the SOP UIDs alone are judged, as before.
    for last, complete in ((SERIES_INSTANCE_UID, True), (SOP_INSTANCE_UID, False)):
        found = _read_with_pydicom(data, implicit, little, last)
        if found is not None:
            return HeaderUids(found, complete)
    return None


def _read_with_pydicom(
    data: bytes, implicit: bool, little: bool, last: int
) -> dict[int, bytes] | None:
    stopped = False

    def stop(tag: int, vr: object, length: int) -> bool:
        nonlocal stopped
        stopped = stopped or tag > last
        return stopped

    try:
        header = read_dataset(BytesIO(data), implicit, little, stop_when=stop)
        found: dict[int, bytes] = {}
        for tag in _CHECKED_UIDS:
            if tag <= last and tag in header:
                value = header.get_item(tag).value
                found[tag] = value if isinstance(value, bytes) else str(value).encode()
    except Exception:  # pydicom raises many kinds on garbage; all mean "unreadable"
        return None
    if not stopped and last == SERIES_INSTANCE_UID:
        return None
    return found


def _walk_plain(data: bytes, implicit: bool) -> HeaderUids | None:
    """:func:`read_header_uids` by walking plain element headers; None means "ask
    pydicom", not "broken".

    The common case a twentieth of pydicom's time (docs/decisions.md#d18), on the
    thread that answers C-STOREs. Anything unusual (an undefined length, an unknown VR,
    elements out of order, a value cut off) is left to pydicom.
    """
    found: dict[int, bytes] = {}
    offset, end, previous = 0, len(data), -1
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", data, offset)
        tag = group << 16 | element
        if tag <= previous:
            return None
        previous = tag
        if implicit:
            (length,) = struct.unpack_from("<L", data, offset + 4)
            offset += 8
        elif (vr := data[offset + 4 : offset + 6]) in _SHORT_LENGTH_VRS:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            offset += 8
        elif vr in _LONG_LENGTH_VRS and offset + 12 <= end:
            (length,) = struct.unpack_from("<L", data, offset + 8)
            offset += 12
        else:
            return None
        if length == UNDEFINED_LENGTH:
            return None
        if tag > SERIES_INSTANCE_UID:
            return HeaderUids(found, complete=True)
        if tag in _CHECKED_UIDS:
            if offset + length > end:
                return None
            found[tag] = data[offset : offset + length]
        offset += length
    return None


class Inflater:
    """Inflates a deflated data set as it arrives, without keeping it.

    Keeps the first ``keep`` inflated bytes (for the header check) and counts the
    rest; memory stays at about :data:`INFLATE_CHUNK` whatever the input inflates
    to. ``problem`` says why the data set must be refused (too large, corrupt,
    incomplete), once there is a reason.
    """

    def __init__(self, limit: int, keep: int) -> None:
        self.limit = limit
        self.keep = keep
        self.prefix = bytearray()
        self.size = 0
        self.problem: Refusal | None = None
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)

    def feed(self, data: bytes | memoryview) -> None:
        pending = bytes(data)
        while pending and self.problem is None:
            try:
                out = self._inflate.decompress(pending, INFLATE_CHUNK)
            except zlib.error as exc:
                self.problem = Refusal(CANNOT_UNDERSTAND, f"deflated data set corrupt: {exc}"[:64])
                return
            self._count(out)
            pending = self._inflate.unconsumed_tail
            if self._inflate.eof:
                return

    def finish(self) -> Refusal | None:
        """Called after the last fragment: the refusal, if any."""
        if self.problem is None and not self._inflate.eof:
            self.problem = Refusal(CANNOT_UNDERSTAND, "deflated data set is incomplete")
        return self.problem

    def _count(self, out: bytes) -> None:
        self.size += len(out)
        if len(self.prefix) < self.keep:
            self.prefix += out[: self.keep - len(self.prefix)]
        if self.size > self.limit:
            self.problem = Refusal(OUT_OF_RESOURCES, "data set inflates past node.max_dataset_size")


def deflated_file_refusal(path: str | os.PathLike[str], limit: int) -> Refusal | None:
    """For a Part 10 file whose transfer syntax is deflated: :class:`Inflater`'s
    verdict, read in 1 MiB chunks; None for any other file.

    For the workers: pydicom inflates a deflated data set whole in memory (even
    with ``stop_before_pixels``), so this runs before it reads the file.
    """
    with open(path, "rb") as file:
        head = file.read(144)
        if len(head) < 144 or head[128:136] != b"DICM\x02\x00\x00\x00":
            return None  # no group length: pydicom reads it, or says why not
        (meta_length,) = struct.unpack_from("<L", head, 140)
        meta = file.read(meta_length)
        syntax = _walk_plain_values(meta, 0x00020010)
        if syntax is None or syntax.rstrip(b"\x00 ") != DEFLATED.encode():
            return None
        inflater = Inflater(limit, keep=0)
        while chunk := file.read(1024 * 1024):
            inflater.feed(chunk)
            if inflater.problem is not None:
                break
        return inflater.finish()


def _walk_plain_values(data: bytes, wanted: int) -> bytes | None:
    """The value of element ``wanted`` in explicit VR little endian ``data``, or None."""
    offset = 0
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<L", data, offset + 8)
            offset += 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            offset += 8
        if (group << 16 | element) == wanted:
            return data[offset : offset + length]
        offset += length
    return None
