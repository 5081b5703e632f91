"""The data-transfer phase of storage associations, read straight off the socket.

pynetdicom negotiates every association (A-ASSOCIATE, roles, TLS, the Gatekeeper's
checks). Once an association whose accepted contexts are all storage, Verification or
Storage Commitment (the peer as SCP) is established, its own thread takes the socket over from pynetdicom: it reads
P-DATA-TF PDUs with blocking reads, streams each data set into a spool file as its
fragments arrive, and answers C-STORE and C-ECHO from byte templates.

Why: pynetdicom's data phase costs several times the CPU per image of DCMTK's
storescp (docs/decisions.md#d17: two reactor threads that poll, several events and a
state-machine step per PDU, a pydicom Dataset for every response); and it holds each
data set in memory whole. This path does none of that; the PDU and DIMSE rules it
follows are PS3.8 9.3 (PDU structure) and PS3.7 E (command sets, Implicit VR Little
Endian). It also takes Storage Commitment N-EVENT-REPORTs from a PACS (PS3.4 J.3.3),
so that every association the node accepts has this one receive path.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)

from node.admission import DEFLATED, EXPLICIT_VR_LITTLE_ENDIAN, Inflater, Refusal, command_refusal
from node.fsutil import DurableFile
from node.pynetdicom_private import Handover, socket_of
from node.spool import Arrival, Spool
from node.statuses import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS

log = logging.getLogger("dicom_node.scp")

# PDU types (PS3.8 9.3.1).
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_ABORT = 0x07
A_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

# A-ABORT source and reason (PS3.8 9.3.8).
SERVICE_USER = 0x00
SERVICE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
UNEXPECTED_PDU = 0x02
INVALID_PDU_PARAMETER = 0x06

# DIMSE command fields (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
N_EVENT_REPORT_RQ = 0x0100
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101

# Command elements used here (group 0000).
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000
EVENT_TYPE_ID = 0x1002
# A Storage Commitment report's event information lists every instance of its
# transaction (~120 bytes each); this bounds what is held in memory to parse it.
MAX_EVENT_INFORMATION = 64 * 1024 * 1024
PROCESSING_FAILURE = 0x0110

# The header check needs the data set up to its SOP Instance UID; the elements before
# it are all short, so the first 64 KiB hold it in any sane data set.
HEADER_PREFIX = 64 * 1024

# (status, error comment or None) for one instance.
Outcome = tuple[int, str | None]
# Judges the start of a data set (bytes, transfer syntax, the command's SOP Class and
# Instance UID): the refusal, or None (node.admission.dataset_refusal).
HeaderCheck = Callable[[bytes, str, str, str], Refusal | None]


class ProtocolError(Exception):
    """The association must be aborted: the peer broke PS3.8/PS3.7, or a node limit."""

    def __init__(self, why: str, source: int = SERVICE_PROVIDER, reason: int = UNEXPECTED_PDU):
        super().__init__(why)
        self.source = source
        self.reason = reason


class PeerClosed(Exception):
    """The connection closed or timed out."""


@dataclass
class StoreTarget:
    """Where a data phase puts instances and whom it tells."""

    spool: Spool
    submit: Callable[[Path], None]
    header_problem: HeaderCheck
    max_dataset_size: Callable[[], int]
    # (assoc, bytes, ok, seconds) after each answered C-STORE.
    stored: Callable[[Any, int, bool, float], None] = lambda *a: None
    # A Storage Commitment report (event type, event information) for the destination
    # whose transaction it settles; returns the status to answer (PS3.4 J.3.3).
    commitment_report: Callable[[int, Dataset | None], int] = lambda *a: PROCESSING_FAILURE


def is_servable(assoc: Any, is_storage: Callable[[UID], bool]) -> bool:
    """True if every accepted context is storage, Verification or Storage Commitment
    (whose reports the peer sends: the node accepts that context only in that role)."""
    contexts = assoc.accepted_contexts
    return bool(contexts) and all(
        cx.abstract_syntax in (Verification, StorageCommitmentPushModel)
        or is_storage(UID(cx.abstract_syntax))
        for cx in contexts
    )


@dataclass
class _Command:
    """A command set being gathered from its fragments."""

    context_id: int
    raw: bytearray = field(default_factory=bytearray)


@dataclass
class _EventReport:
    """An N-EVENT-REPORT-RQ whose event information is still arriving."""

    context_id: int
    fields: dict[int, bytes]
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Instance:
    """One C-STORE data set on its way into the spool."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    started: float
    file: DurableFile | None = None
    prefix: bytearray = field(default_factory=bytearray)
    checked: bool = False
    size: int = 0
    # A deflated data set is inflated as it arrives, to bound and check it.
    inflater: Inflater | None = None
    # Set when something failed; Success is only ever set by _make_durable.
    outcome: Outcome | None = None


class DataPhase:
    """Serves one established storage association until it is released or aborted."""

    def __init__(self, assoc: Any, target: StoreTarget, network_timeout: float | None) -> None:
        self.assoc = assoc
        self.target = target
        self.sock: socket.socket = socket_of(assoc)
        self.sock.settimeout(network_timeout)
        self._send_lock = threading.Lock()
        self._aborted_locally = False
        self._contexts = {cx.context_id: cx for cx in assoc.accepted_contexts}
        # The peer's maximum PDU length (0: no limit); our responses must fit it.
        self._peer_max = int(assoc.requestor.maximum_length or 0)
        self._command: _Command | None = None
        self._instance: _Instance | None = None
        self._report: _EventReport | None = None
        self._ahead: DurableFile | None = None  # the next instance's spool file
        self._header = bytearray(6)
        self._body = bytearray(int(assoc.acceptor.maximum_length or 0) + 6)

    # ------------------------------------------------------------------ the loop

    def run(self) -> str:
        """Serve the association; return how it ended: ``released`` or ``aborted``."""
        try:
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == P_DATA_TF:
                    self._on_pdata(body)
                elif pdu_type == A_RELEASE_RQ:
                    self._drop_unfinished("the peer released the association mid-message")
                    self._send(A_RELEASE_RP_PDU)
                    return "released"
                elif pdu_type == A_ABORT:
                    self._drop_unfinished("the peer aborted the association")
                    return "aborted"
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} in data transfer")
        except ProtocolError as exc:
            log.warning("aborting the association with %s: %s", self.peer(), exc)
            self._drop_unfinished(str(exc))
            self._send_abort(exc.source, exc.reason)
            return "aborted"
        except PeerClosed as exc:
            if not self._aborted_locally:
                log.warning("association with %s ended: %s", self.peer(), exc)
            self._drop_unfinished(str(exc))
            return "aborted"
        except Exception:  # a bug: the caller aborts; no temp file or descriptor is left
            self._drop_unfinished("internal error")
            raise
        finally:
            if self._ahead is not None:
                self._ahead.discard()

    def abort(self) -> None:
        """Abort from another thread (shutdown); the loop's blocking read then ends."""
        self._aborted_locally = True
        self._send_abort(SERVICE_USER, REASON_NOT_SPECIFIED)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ PDUs

    def _read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU's type and body; the body is only valid until the next read."""
        header = self._read_exact(6, self._header)
        pdu_type, _, length = struct.unpack(">BBL", header)
        # Our A-ASSOCIATE-AC told the peer our maximum; allow the PDU header on top.
        limit = (self.assoc.acceptor.maximum_length or 0) + 6
        if pdu_type == P_DATA_TF and limit > 6 and length > limit:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds the negotiated maximum")
        if pdu_type != P_DATA_TF and length > 64 * 1024:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} with a length of {length}")
        if length > len(self._body):
            self._body = bytearray(length)
        # One buffer for every PDU: each is written out before the next is read.
        return pdu_type, self._read_exact(length, self._body)

    def _read_exact(self, n: int, buffer: bytearray) -> memoryview:
        view = memoryview(buffer)[:n]
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise PeerClosed("no data within node.network_timeout") from None
            except OSError as exc:
                raise PeerClosed(f"connection error: {exc}") from None
            if k == 0:
                raise PeerClosed("the peer closed the connection")
            got += k
        return view

    def _on_pdata(self, body: memoryview) -> None:
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                raise ProtocolError("truncated presentation data value item")
            (item_length,) = struct.unpack_from(">L", body, offset)
            if item_length < 2 or offset + 4 + item_length > len(body):
                raise ProtocolError("presentation data value item length out of range")
            context_id, control = body[offset + 4], body[offset + 5]
            fragment = body[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if context_id not in self._contexts:
                raise ProtocolError(f"presentation context {context_id} was not accepted")
            if control & 0x01:
                self._on_command_fragment(context_id, fragment, last=bool(control & 0x02))
            else:
                self._on_data_fragment(context_id, fragment, last=bool(control & 0x02))

    # ------------------------------------------------------------------ DIMSE

    def _on_command_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._instance is not None or self._report is not None:
            raise ProtocolError("a command arrived before the previous data set was complete")
        if self._command is None:
            self._command = _Command(context_id)
        elif self._command.context_id != context_id:
            raise ProtocolError("command fragments on different presentation contexts")
        self._command.raw += fragment
        if len(self._command.raw) > 64 * 1024:
            raise ProtocolError("command set longer than 64 KiB")
        if last:
            command, self._command = self._command, None
            self._on_command(command.context_id, parse_command(bytes(command.raw)))

    def _on_command(self, context_id: int, fields: dict[int, bytes]) -> None:
        command = _us(fields, COMMAND_FIELD)
        has_data = _us(fields, DATA_SET_TYPE) != NO_DATA_SET
        if command == C_ECHO_RQ and not has_data:
            self._respond(context_id, echo_response(fields, SUCCESS))
        elif command == C_STORE_RQ:
            self._begin_store(context_id, fields, has_data)
        elif command == N_EVENT_REPORT_RQ and self._is_commitment(context_id):
            report = _EventReport(context_id, fields)
            if has_data:
                self._report = report
            else:
                self._answer_report(report)
        elif command == C_CANCEL_RQ:
            pass  # nothing here runs long enough to cancel (PS3.7 9.3.2.3)
        else:
            raise ProtocolError(f"DIMSE command 0x{command:04X} is not served on this association")

    def _begin_store(self, context_id: int, fields: dict[int, bytes], has_data: bool) -> None:
        sop_class, sop_instance = (
            _uid(fields, AFFECTED_SOP_CLASS),
            _uid(fields, AFFECTED_SOP_INSTANCE),
        )
        instance = _Instance(
            context_id=context_id,
            message_id=_us(fields, MESSAGE_ID),
            sop_class=sop_class,
            sop_instance=sop_instance,
            transfer_syntax=str(self._contexts[context_id].transfer_syntax[0]),
            started=time.perf_counter(),
        )
        if not has_data:
            instance.outcome = (CANNOT_UNDERSTAND, "C-STORE request without a data set")
            self._finish(context_id, instance)
            return
        refusal = command_refusal(
            fields.get(AFFECTED_SOP_CLASS, b""), fields.get(AFFECTED_SOP_INSTANCE, b"")
        )
        if refusal is not None:
            log.warning("refused an instance from %s: %s", self.peer(), refusal.comment)
            instance.outcome = (refusal.status, refusal.comment)
            # Not echoed in the response: they are optional there (PS3.7 9.3.1.2).
            instance.sop_class = instance.sop_instance = ""
        else:
            if instance.transfer_syntax == DEFLATED:
                instance.inflater = Inflater(self.target.max_dataset_size(), HEADER_PREFIX)
            try:
                arrival = Arrival.on(self.assoc, sop_class, sop_instance, instance.transfer_syntax)
                ahead, self._ahead = self._ahead, None
                instance.file = self.target.spool.begin(arrival, ahead)
            except OSError as exc:
                instance.outcome = self._cannot_store(instance, exc)
        self._instance = instance

    def _is_commitment(self, context_id: int) -> bool:
        return bool(self._contexts[context_id].abstract_syntax == StorageCommitmentPushModel)

    def _on_report_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        report = self._report
        assert report is not None
        if report.context_id != context_id:
            raise ProtocolError("event information on another presentation context")
        report.data += fragment
        if len(report.data) > MAX_EVENT_INFORMATION:
            raise ProtocolError("N-EVENT-REPORT event information larger than 64 MiB")
        if last:
            self._report = None
            self._answer_report(report)

    def _answer_report(self, report: _EventReport) -> None:
        """Hand a Storage Commitment report to its destination, then answer it."""
        syntax = str(self._contexts[report.context_id].transfer_syntax[0])
        try:
            info = decode_dataset(bytes(report.data), syntax) if report.data else None
            status = self.target.commitment_report(_us(report.fields, EVENT_TYPE_ID), info)
        except ProtocolError:
            raise
        except Exception:  # a bug or a broken report must not end the association
            log.exception("cannot process a storage commitment report from %s", self.peer())
            status = PROCESSING_FAILURE
        self._respond(report.context_id, event_report_response(report.fields, status))

    def _on_data_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._report is not None:
            self._on_report_fragment(context_id, fragment, last)
            return
        instance = self._instance
        if instance is None or instance.context_id != context_id:
            raise ProtocolError("a data set fragment without its C-STORE command")
        instance.size += len(fragment)
        if instance.size > self.target.max_dataset_size():
            raise ProtocolError(
                f"data set larger than node.max_dataset_size ({self.target.max_dataset_size()} "
                "bytes)",
                SERVICE_USER,
                REASON_NOT_SPECIFIED,
            )
        if instance.file is not None and instance.inflater is not None:
            self._inflate(instance, fragment, last)
        elif instance.file is not None and not instance.checked:
            instance.prefix += fragment[: HEADER_PREFIX - len(instance.prefix)]
            if last or len(instance.prefix) >= HEADER_PREFIX:
                self._check_header(instance, bytes(instance.prefix), instance.transfer_syntax)
        self._write(instance, fragment)
        if last:
            self._instance = None
            self._finish(context_id, instance)

    def _check_header(self, instance: _Instance, prefix: bytes, transfer_syntax: str) -> None:
        instance.checked = True
        instance.prefix = bytearray()
        refusal = self.target.header_problem(
            prefix, transfer_syntax, instance.sop_class, instance.sop_instance
        )
        if refusal is not None:
            self._refuse(instance, refusal)

    def _inflate(self, instance: _Instance, fragment: memoryview, last: bool) -> None:
        """Inflate a deflated fragment to count its size and check its header."""
        inflater = instance.inflater
        assert inflater is not None
        inflater.feed(fragment)
        if not instance.checked and (last or len(inflater.prefix) >= HEADER_PREFIX):
            self._check_header(instance, bytes(inflater.prefix), EXPLICIT_VR_LITTLE_ENDIAN)
        problem = inflater.problem or (inflater.finish() if last else None)
        if problem is not None and instance.file is not None:
            self._refuse(instance, problem)
        if instance.file is None:
            instance.inflater = None  # refused: the rest is read and dropped

    def _refuse(self, instance: _Instance, refusal: Refusal) -> None:
        log.warning("refused an instance from %s: %s", self.peer(), refusal.comment)
        instance.outcome = (refusal.status, refusal.comment)
        self._discard(instance)

    def _write(self, instance: _Instance, fragment: memoryview) -> None:
        if instance.file is None:
            return
        try:
            instance.file.write(fragment)
        except OSError as exc:
            instance.outcome = self._cannot_store(instance, exc)
            self._discard(instance)

    def _finish(self, context_id: int, instance: _Instance) -> None:
        """Make the instance durable, queue it, then answer; in that order."""
        if instance.outcome is None:
            instance.outcome = self._make_durable(instance)
        status, comment = instance.outcome
        self._respond(context_id, store_response(instance, status, comment))
        self._create_next_file()
        self.target.stored(
            self.assoc, instance.size, status == SUCCESS, time.perf_counter() - instance.started
        )

    def _create_next_file(self) -> None:
        """The next C-STORE's spool file, created while the peer is still preparing it."""
        if self._ahead is None:
            with contextlib.suppress(OSError):  # begin() tries again and answers the error
                self._ahead = self.target.spool.create_ahead()

    def _make_durable(self, instance: _Instance) -> Outcome:
        """fsync, rename and directory fsync of the spool file, then queue it: Success."""
        assert instance.file is not None, "nothing failed, so the spool file is open"
        file, instance.file = instance.file, None
        try:
            path = file.commit()
        except OSError as exc:
            return self._cannot_store(instance, exc)
        self.target.submit(path)
        return (SUCCESS, None)

    def _cannot_store(self, instance: _Instance, exc: OSError) -> Outcome:
        log.error(
            "cannot store %s from %s in the spool: %s", instance.sop_instance, self.peer(), exc
        )
        return (OUT_OF_RESOURCES, f"node cannot store the instance: {exc.strerror or exc}")

    def _discard(self, instance: _Instance) -> None:
        if instance.file is not None:
            instance.file.discard()
            instance.file = None

    def _drop_unfinished(self, why: str) -> None:
        """An instance cut off mid-transfer was never acknowledged: drop its partial file."""
        if self._instance is not None:
            log.warning(
                "instance %s from %s not received whole (%s); it was not acknowledged",
                self._instance.sop_instance,
                self.peer(),
                why,
            )
            self._discard(self._instance)
            self._instance = None

    # ------------------------------------------------------------------ sending

    def _respond(self, context_id: int, command: bytes) -> None:
        self._send(pdata_pdus(context_id, command, self._peer_max))

    def _send_abort(self, source: int, reason: int) -> None:
        with contextlib.suppress(PeerClosed):
            self._send(struct.pack(">BBLxxBB", A_ABORT, 0, 4, source, reason))

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise PeerClosed(f"cannot send: {exc}") from None

    def peer(self) -> str:
        requestor = self.assoc.requestor
        return f"{requestor.ae_title} at {requestor.address}"


# ---------------------------------------------------------------------- encoding


def parse_command(raw: bytes) -> dict[int, bytes]:
    """A command set (group 0000, Implicit VR Little Endian) as {element: value bytes}."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise ProtocolError("truncated command set")
        group, element, length = struct.unpack_from("<HHL", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(raw):
            raise ProtocolError("command set is not a valid group 0000")
        fields[element] = raw[offset : offset + length]
        offset += length
    if COMMAND_FIELD not in fields:
        raise ProtocolError("command set without a Command Field")
    return fields


def _us(fields: dict[int, bytes], element: int) -> int:
    value = fields.get(element, b"")
    if len(value) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) is not a US value")
    number: int = struct.unpack("<H", value)[0]
    return number


def _uid(fields: dict[int, bytes], element: int) -> str:
    return fields.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if element in (AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE) else b" "
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def store_response(instance: _Instance, status: int, comment: str | None) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2)."""
    elements = [
        (AFFECTED_SOP_CLASS, instance.sop_class.encode("ascii", "replace")),
        (COMMAND_FIELD, struct.pack("<H", 0x8001)),
        (MESSAGE_ID_RESPONDED_TO, struct.pack("<H", instance.message_id)),
        (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        (STATUS, struct.pack("<H", status)),
    ]
    if comment:
        elements.append((ERROR_COMMENT, comment[:64].encode("ascii", "replace")))
    elements.append((AFFECTED_SOP_INSTANCE, instance.sop_instance.encode("ascii", "replace")))
    return command_set([(tag, value) for tag, value in elements if value])


def echo_response(fields: dict[int, bytes], status: int) -> bytes:
    """A C-ECHO-RSP command set (PS3.7 9.3.5.2)."""
    sop_class = _uid(fields, AFFECTED_SOP_CLASS) or str(Verification)
    return command_set(
        [
            (AFFECTED_SOP_CLASS, sop_class.encode("ascii")),
            (COMMAND_FIELD, struct.pack("<H", 0x8030)),
            (MESSAGE_ID_RESPONDED_TO, struct.pack("<H", _us(fields, MESSAGE_ID))),
            (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
            (STATUS, struct.pack("<H", status)),
        ]
    )


def event_report_response(fields: dict[int, bytes], status: int) -> bytes:
    """An N-EVENT-REPORT-RSP command set (PS3.7 10.3.1.2)."""
    return command_set(
        [
            (AFFECTED_SOP_CLASS, fields.get(AFFECTED_SOP_CLASS, b"").rstrip(b"\x00")),
            (COMMAND_FIELD, struct.pack("<H", 0x8100)),
            (MESSAGE_ID_RESPONDED_TO, struct.pack("<H", _us(fields, MESSAGE_ID))),
            (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
            (STATUS, struct.pack("<H", status)),
            (AFFECTED_SOP_INSTANCE, fields.get(AFFECTED_SOP_INSTANCE, b"").rstrip(b"\x00")),
            (EVENT_TYPE_ID, fields.get(EVENT_TYPE_ID, b"")),
        ]
    )


def decode_dataset(data: bytes, transfer_syntax: str) -> Dataset:
    """A small data set (event information) received on a context of ``transfer_syntax``."""
    syntax = UID(transfer_syntax)
    return read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)


def pdata_pdus(context_id: int, command: bytes, peer_max: int) -> bytes:
    """P-DATA-TF PDUs carrying a command set, fragmented to the peer's maximum PDU length."""
    room = (peer_max - 6) if peer_max else len(command)  # a PDV item header is 6 bytes
    room = max(room, 1)
    out = []
    for start in range(0, len(command), room):
        chunk = command[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command) else 0x00)
        item = struct.pack(">LBB", len(chunk) + 2, context_id, control) + chunk
        out.append(struct.pack(">BBL", P_DATA_TF, 0, len(item)) + item)
    return b"".join(out)


# ---------------------------------------------------------------------- pynetdicom hooks

_HANDOVER = "_dicom_node_handover"


def hold_at_established(assoc: Any, wait_seconds: float) -> None:
    """EVT_CONN_OPEN: hold the DUL thread before its first P-DATA read (see Handover)."""
    setattr(assoc, _HANDOVER, Handover(assoc, wait_seconds))


def serve(
    event: Event,
    target: StoreTarget,
    is_storage: Callable[[UID], bool],
    network_timeout: Callable[[], float | None],
) -> None:
    """EVT_ESTABLISHED: take a storage-only association over, or leave it to pynetdicom."""
    assoc = event.assoc
    handover: Handover | None = getattr(assoc, _HANDOVER, None)
    if handover is None:
        return
    take = is_servable(assoc, is_storage)
    if not handover.decide(take):
        assoc.abort()
        return
    if not take:
        return
    phase = DataPhase(assoc, target, network_timeout())
    # The node's shutdown aborts associations this way.
    assoc.abort = phase.abort  # type: ignore[method-assign,assignment]
    try:
        how = phase.run()
    except Exception:  # a bug here must not leave the association half-open
        log.exception("data phase with %s failed; aborting", phase.peer())
        phase.abort()
        how = "aborted"
    assoc.is_established = False
    if how == "released":
        assoc.is_released = True
        evt.trigger(assoc, evt.EVT_RELEASED, {})
    else:
        assoc.is_aborted = True
        evt.trigger(assoc, evt.EVT_ABORTED, {})
