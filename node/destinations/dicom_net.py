"""Talking DICOM to a destination's peer: associations, presentation contexts, C-ECHO.

Shared by the sender (:mod:`node.destinations.dicom_sender`) and ``dicom-node echo``.
Every association the node opens is guarded by
:func:`node.pynetdicom_private.keep_responses_from_the_reactor`.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.destinations.dicom import ClientTls, DicomDestination
from node.errors import DeliveryError
from node.pynetdicom_private import keep_responses_from_the_reactor, shorter_dul_poll, socket_of

UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: context ids are odd numbers 1-255
RESPONSE_POLL_SECONDS = 0.0002


@dataclass(frozen=True)
class Meta:
    """What negotiation needs to know about a pending file (its file meta)."""

    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


class AssociationFailed(Exception):
    """No association; ``permanent`` when the peer rejected it permanently."""

    def __init__(self, message: str, permanent: bool = False, no_contexts: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        # The peer answered but accepted none of the proposed presentation contexts.
        self.no_contexts = no_contexts


# --------------------------------------------------------------------------- negotiation


class ContextPlan:
    """The presentation contexts an association proposes, at most 128."""

    def __init__(self, fallback: str, limit: int = MAX_CONTEXTS) -> None:
        self.fallback = fallback
        self.limit = limit
        self.pairs: list[tuple[UID, UID]] = []

    def wanted(self, meta: Meta) -> list[tuple[UID, UID]]:
        syntaxes = [meta.transfer_syntax]
        if self.fallback == "uncompressed" or meta.transfer_syntax in UNCOMPRESSED:
            # The file's syntax first; the default syntax is offered for every class
            # (PS3.5 10), and decompression makes the others possible.
            syntaxes += [ts for ts in UNCOMPRESSED if ts != meta.transfer_syntax]
        return [(meta.sop_class, ts) for ts in syntaxes]

    def add(self, meta: Meta) -> bool:
        new = [p for p in self.wanted(meta) if p not in self.pairs]
        if len(self.pairs) + len(new) > self.limit:
            return False
        self.pairs += new
        return True

    def covers(self, meta: Meta) -> bool:
        return all(p in self.pairs for p in self.wanted(meta))

    def contexts(self) -> list[PresentationContext]:
        return [build_context(sop, [ts]) for sop, ts in self.pairs]


def _no_delay(event: Event) -> None:
    """Nagle's algorithm off: otherwise each C-STORE can wait for a delayed ACK
    (docs/decisions.md#d15)."""
    sock = socket_of(event.assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client_tls_context(tls: ClientTls) -> ssl.SSLContext:
    """TLS 1.2 or newer (PS3.15 B.9); the peer's certificate must be signed by ``tls.ca``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate and tls.private_key:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def new_ae(dest: DicomDestination) -> AE:
    ae = AE(ae_title=dest.calling_ae_title)
    ae.maximum_pdu_size = dest.max_pdu
    ae.connection_timeout = dest.timeout
    ae.acse_timeout = dest.timeout
    ae.dimse_timeout = dest.timeout
    ae.network_timeout = dest.timeout
    return ae


def associate(
    ae: AE,
    dest: DicomDestination,
    contexts: list[PresentationContext],
    handlers: list[tuple[evt.EventType, Callable[..., Any]]] | None = None,
) -> Association:
    """An established association, or :class:`AssociationFailed` saying why not."""
    connected = threading.Event()

    def on_open(event: Event) -> None:
        _no_delay(event)
        # Responses wait for the DUL thread's next poll: 0.2 ms instead of 1 ms.
        shorter_dul_poll(event.assoc, RESPONSE_POLL_SECONDS)
        connected.set()

    assoc = ae.associate(
        dest.host,
        dest.port,
        contexts=contexts,
        ae_title=dest.ae_title,
        max_pdu=dest.max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *(handlers or [])],
        tls_args=(client_tls_context(dest.tls), dest.host) if dest.tls else None,
    )
    if assoc.is_established:
        keep_responses_from_the_reactor(assoc)
        return assoc
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if not connected.is_set():
        # pynetdicom reports a refused connection as an aborted association.
        raise AssociationFailed(f"cannot connect to {where} (refused, unreachable or timed out)")
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        reason = f"{getattr(rsp, 'reason_str', '?')} (source: {getattr(rsp, 'source_str', '?')})"
        if result == 0x01:
            raise AssociationFailed(f"{where} rejected the association permanently: {reason}", True)
        raise AssociationFailed(f"{where} rejected the association for now: {reason}")
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom aborts an association without a single usable context.
        raise AssociationFailed(
            f"{where} accepted none of the proposed presentation contexts",
            permanent=True,
            no_contexts=True,
        )
    raise AssociationFailed(f"{where} aborted or did not answer the association request")


# --------------------------------------------------------------------------- echo


@dataclass(frozen=True)
class EchoReport:
    seconds: float
    sop_class: UID
    accepted: list[UID]
    refused: list[UID]


def echo(dest: DicomDestination, sop_class: str, syntaxes: Iterable[str]) -> EchoReport:
    """C-ECHO the peer and ask which of ``syntaxes`` it accepts for ``sop_class``."""
    sop = UID(sop_class)
    offered = [UID(ts) for ts in syntaxes][: MAX_CONTEXTS - 1]
    contexts = [build_context(Verification)] + [build_context(sop, [ts]) for ts in offered]
    started = time.perf_counter()
    try:
        assoc = associate(new_ae(dest), dest, contexts)
    except AssociationFailed as exc:
        raise DeliveryError(f"{dest.name}: {exc}") from exc
    try:
        status = assoc.send_c_echo()
        seconds = time.perf_counter() - started
        if "Status" not in status or int(status.Status) != 0:
            code = f"0x{int(status.Status):04X}" if "Status" in status else "none"
            raise DeliveryError(f"{dest.name}: C-ECHO failed (status {code})")
        accepted = [
            UID(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop
        ]
    finally:
        if assoc.is_established:
            assoc.release()
    return EchoReport(seconds, sop, accepted, [ts for ts in offered if ts not in accepted])
