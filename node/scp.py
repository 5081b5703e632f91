"""Associations: negotiation, access control and TLS, then the data phase.

pynetdicom negotiates every association; the data phase (C-STORE, C-ECHO, Storage
Commitment reports) is served by node/dataphase.py, the one receive path. A C-STORE
is answered Success only after its data set is durable in the spool; nothing here
decodes a data set, and compression happens later in workers.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node import dataphase, proxy
from node.admission import (
    dataset_refusal,
)
from node.config import NodeSettings, ProxyProtocolSettings, TlsSettings
from node.dataphase import StoreTarget
from node.errors import StartupError
from node.pynetdicom_private import (
    Negotiate,
    enable_unrestricted_storage,
    is_storage_like,
    protect_acceptor,
    shorter_dul_poll,
)
from node.rules import in_networks
from node.spool import Spool
from node.statuses import PROCESSING_FAILURE

log = logging.getLogger("dicom_node.scp")


# What the node accepts from senders: the uncompressed syntaxes and the common
# compressed ones (a compressed instance is passed on or transcoded by the workers).
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_ACCEPTED = frozenset(ACCEPTED_TRANSFER_SYNTAXES)
DUL_POLL_SECONDS = 0.0002
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
_USER_REJECTION = 0x01

Submit = Callable[[Path], None]
# Hands a Storage Commitment N-EVENT-REPORT (event type, event information) to the
# destination whose transaction it settles; returns the status to answer.
CommitmentReport = Callable[[int, Dataset | None], int]


class BalancerAddress(tuple[str, int]):
    """The (host, port) of a connection the balancer opened for itself (PROXY LOCAL):
    its health checks, whose associations are logged at DEBUG only."""


def is_health_check(assoc: Any) -> bool:
    return bool(getattr(assoc, "_dicom_node_health_check", False))


@dataclass(frozen=True)
class Door:
    """What a listener checks on each accepted connection before pynetdicom sees it.

    Callables, so that a reload's new settings apply to the next connection.
    """

    proxy_protocol: Callable[[], ProxyProtocolSettings | None]
    draining: Callable[[], bool]
    handshake_timeout: Callable[[], float]


class NoDelayAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Nagle's algorithm off on every accepted socket,
    and the PROXY header and TLS handshake done in the connection's own thread.

    With Nagle on, each C-STORE round trip can stall waiting for a delayed ACK
    (docs/decisions.md#d15). pynetdicom wraps TLS in its accept loop, where one client that never completes
    its handshake holds up every other; here the accept loop only accepts, and the
    connection's thread reads the PROXY header (before TLS: the balancer sends it in
    the clear) and then shakes hands, each within a timeout. The address pynetdicom
    then gets as ``client_address`` is the association's requestor address, which
    the allow-list, the rules, the logs and the spool use.
    """

    door: Door | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            opened = self._open(request, client_address)
        except Exception:  # a bug here must cost one connection, not a silent thread death
            log.exception("connection from %s:%s failed before DICOM", *client_address[:2])
            opened = None
        if opened is None:
            self.shutdown_request(request)
            return
        super().process_request_thread(*opened)

    def _open(self, sock: socket.socket, peer: tuple[str, int]) -> tuple[Any, Any] | None:
        """The socket to hand pynetdicom and the client's address, or None to close."""
        door = self.door
        timeout = door.handshake_timeout() if door is not None else 30.0
        settings = door.proxy_protocol() if door is not None else None
        address: tuple[str, int] | None = (peer[0], peer[1])
        if settings is not None and door is not None:
            address = self._client_address(sock, (peer[0], peer[1]), settings, door, timeout)
        if address is None:
            return None
        if self.ssl_context is None:
            return sock, address
        try:
            sock.settimeout(timeout)
            tls = self.ssl_context.wrap_socket(sock, server_side=True)
            tls.settimeout(None)
        except (OSError, ValueError) as exc:
            log.info("TLS handshake with %s:%s failed: %s", address[0], address[1], exc)
            return None
        return tls, address

    @staticmethod
    def _client_address(
        sock: socket.socket,
        peer: tuple[str, int],
        settings: ProxyProtocolSettings,
        door: Door,
        timeout: float,
    ) -> tuple[str, int] | None:
        """The caller's address under node.proxy_protocol, or None to close."""
        if proxy.trusted(peer[0], settings.direct):
            return peer
        if not proxy.trusted(peer[0], settings.trusted):
            log.warning(
                "connection from %s:%s refused: not in node.proxy_protocol.trusted nor .direct",
                *peer,
            )
            return None
        try:
            header = proxy.read_header(sock, peer, min(timeout, proxy.HEADER_TIMEOUT))
        except proxy.HeaderError as exc:
            level = logging.DEBUG if exc.silent else logging.WARNING
            log.log(level, "connection from %s:%s closed: %s", *peer, exc)
            return None
        if header.kind is proxy.Kind.PROXIED:
            return header.address
        if door.draining():
            # The balancer's own check (a DICOM-level tcp-check): fail it while draining.
            log.debug("draining: health check connection from %s:%s closed", *peer)
            return None
        return BalancerAddress(header.address)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket; associations go on.

        pynetdicom's own shutdown expects a server made by ``AE.start_server``.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def build_ae(settings: NodeSettings) -> AE:
    """An AE that accepts every storage SOP class (known, private or future) and C-ECHO."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    # pynetdicom counts every open connection, including ones that never sent an
    # A-ASSOCIATE-RQ and wait out the ACSE timeout (a port probe, a PDU that declares
    # 2 GB and closes): 10 of those locked everyone out. Gatekeeper counts only
    # negotiated associations against node.max_associations; this is a backstop.
    ae.maximum_associations = 64 * settings.max_associations
    ae.require_called_aet = False  # checked by Gatekeeper, which logs the caller
    ae.network_timeout = settings.network_timeout
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.add_supported_context(Verification, list(ACCEPTED_TRANSFER_SYNTAXES[:3]))
    # A PACS that confirms Storage Commitment on a new association opens it to us and
    # proposes the SCP role for itself (PS3.4 J.3.3, PS3.7 D.3.3.4): accept that role.
    ae.add_supported_context(
        StorageCommitmentPushModel,
        list(ACCEPTED_TRANSFER_SYNTAXES[:2]),
        scu_role=False,
        scp_role=True,
    )
    return ae


def enable_any_storage_class() -> None:
    """Accept every storage-like abstract syntax with the syntaxes the node can read.

    pynetdicom's unrestricted storage mode accepts the first proposed transfer
    syntax whatever it is; we narrow that to :data:`ACCEPTED_TRANSFER_SYNTAXES` so
    that nothing the workers cannot read is ever acknowledged.
    """
    enable_unrestricted_storage(_negotiate)


def _negotiate(
    original: Negotiate,
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: Any,
) -> Any:
    kept, refused = [], []
    for rcx in rq_contexts:
        if not _is_storage_like(UID(str(rcx.abstract_syntax))):
            kept.append(rcx)
            continue
        readable = [ts for ts in rcx.transfer_syntax if ts in _ACCEPTED]
        if readable:
            kept.append(_context(rcx, readable))
        else:
            refused.append(
                _context(rcx, rcx.transfer_syntax[:1], result=_TRANSFER_SYNTAXES_NOT_SUPPORTED)
            )
    result, reply_roles = original(kept, ac_contexts, roles)
    result, reply_roles = _commitment_only_as_peer_scp(result, reply_roles, roles or {})
    return sorted(result + refused, key=lambda cx: cx.context_id or 0), reply_roles


def _commitment_only_as_peer_scp(
    contexts: list[PresentationContext], reply_roles: Any, roles: dict[Any, Any]
) -> tuple[list[PresentationContext], Any]:
    """Reject the Storage Commitment Push Model context unless the peer proposed the
    SCP role for itself (a PACS that sends N-EVENT-REPORTs, PS3.4 J.3.3).

    The node does not commit instances for others: a modality that proposes the
    context as SCU (to send N-ACTIONs) gets it rejected (user rejection) and knows.
    """
    rejected = set()
    for cx in contexts:
        if cx.abstract_syntax == StorageCommitmentPushModel and cx.result == 0x00:
            _scu, scp = roles.get(StorageCommitmentPushModel, (None, None))
            if not scp:
                cx.result = _USER_REJECTION
                rejected.add(StorageCommitmentPushModel)
    if rejected and reply_roles:
        reply_roles = [r for r in reply_roles if r.sop_class_uid not in rejected]
    return contexts, reply_roles


def _is_storage_like(uid: UID) -> bool:
    return is_storage_like(uid)


def _context(
    rcx: PresentationContext, syntaxes: Sequence[str], result: int | None = None
) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = rcx.context_id
    cx.abstract_syntax = rcx.abstract_syntax
    cx.transfer_syntax = list(syntaxes)
    if result is not None:
        cx.result = result
    return cx


@dataclass
class _Traffic:
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    failures: int = 0
    bytes: int = 0


class AssociationLog:
    """One log line per association: peer, AE titles, instances, bytes, duration."""

    def __init__(self, metrics: ReceiveMetrics | None = None) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, _Traffic] = {}
        self._metrics = metrics

    def opened(self, event: Event) -> None:
        with self._lock:
            self._open[id(event.assoc)] = _Traffic()

    def stored(self, assoc: Any, size: int, ok: bool, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.received(size, ok, seconds)
        with self._lock:
            traffic = self._open.setdefault(id(assoc), _Traffic())
            traffic.instances += ok
            traffic.failures += not ok
            traffic.bytes += size

    def closed(self, event: Event, how: str) -> None:
        with self._lock:
            traffic = self._open.pop(id(event.assoc), None)
        if traffic is None:
            return
        requestor = event.assoc.requestor
        log.log(
            logging.DEBUG if is_health_check(event.assoc) else logging.INFO,
            "association %s: %s at %s:%s -> %s, %d instance(s) stored, %d refused, %d bytes, %.2fs",
            how,
            requestor.ae_title,
            requestor.address,
            requestor.port,
            event.assoc.acceptor.ae_title,
            traffic.instances,
            traffic.failures,
            traffic.bytes,
            time.monotonic() - traffic.started,
        )


class Gatekeeper:
    """Refuses callers the config does not allow, with the A-ASSOCIATE-RJ reason that fits.

    pynetdicom's own checks take exact AE titles only; sites list scanners by glob
    (``CT_*``) and by network.
    """

    def __init__(
        self, settings: NodeSettings, established: Callable[[Event], int] | None = None
    ) -> None:
        self.settings = settings
        # How many associations are in progress; with several receiving processes, the
        # count across all of them (node/receivers.py).
        self._count = established or self._established

    def check(self, event: Event) -> None:
        request = event.assoc.requestor.primitive
        assert request is not None  # the A-ASSOCIATE-RQ this event is about
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = str(event.assoc.requestor.address)
        if self._count(event) >= self.settings.max_associations:
            log.warning(
                "association rejected: %d associations in progress (node.max_associations); "
                "%r at %s may try again",
                self.settings.max_associations,
                calling,
                address,
            )
            # Rejected transient, by the presentation service provider: local limit exceeded.
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)
            event.assoc.kill()
        elif self.settings.allow and not self.allowed(calling, address):
            self._reject(
                event,
                CALLING_AE_NOT_RECOGNISED,
                f"caller {calling!r} at {address} is not in node.allow",
            )
        elif self.settings.require_called_ae_title and called != self.settings.ae_title:
            self._reject(
                event,
                CALLED_AE_NOT_RECOGNISED,
                f"{calling!r} at {address} called {called!r}, not {self.settings.ae_title!r}",
            )

    @staticmethod
    def _established(event: Event) -> int:
        return sum(
            1 for a in event.assoc.ae.active_associations if a.is_acceptor and a.is_established
        )

    def allowed(self, calling: str, address: str) -> bool:
        return any(
            (
                not entry.calling_ae_title
                or any(fnmatchcase(calling, p) for p in entry.calling_ae_title)
            )
            and (not entry.peer_networks or in_networks(address, entry.peer_networks))
            for entry in self.settings.allow
        )

    @staticmethod
    def _reject(event: Event, diagnostic: int, why: str) -> None:
        log.warning("association rejected: %s", why)
        # Rejected permanent, by the service user, with the diagnostic (PS3.8 9.3.4).
        event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
        # As pynetdicom does after its own rejections: wait until the RJ is out.
        event.assoc.kill()


def server_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS 1.2 or newer (PS3.15 B.9, BCP 195); client certificates when a CA is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.client_ca is not None:
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"node.tls: cannot load certificate or key: {exc}") from exc
    return context


class ReceiveMetrics(Protocol):
    """What the receiving side counts (node.metrics.Metrics, or a receiving process's
    link to the main process that keeps the metrics)."""

    def received(self, size: int, ok: bool, seconds: float) -> None: ...

    def protocol_error(self, kind: str) -> None: ...


def handlers(
    spool: Spool,
    submit: Submit,
    gatekeeper: Gatekeeper,
    metrics: ReceiveMetrics | None = None,
    commitment_report: CommitmentReport | None = None,
    watchers: list[Any] | None = None,
) -> list[Any]:
    """pynetdicom's event handlers for the node's listeners; ``watchers`` are more
    (event, handler) pairs for notification events (association opened and ended)."""
    associations = AssociationLog(metrics)
    target = StoreTarget(
        spool=spool,
        submit=submit,
        header_problem=dataset_refusal,
        max_dataset_size=lambda: gatekeeper.settings.max_dataset_size,
        stored=associations.stored,
        commitment_report=commitment_report or _no_commitment_expected,
    )
    return [
        (
            evt.EVT_CONN_OPEN,
            _prepare_connection,
            [lambda: gatekeeper.settings.acse_timeout, ReactorErrors(metrics)],
        ),
        (
            evt.EVT_ESTABLISHED,
            dataphase.serve,
            [target, _is_storage_like, lambda: gatekeeper.settings.network_timeout],
        ),
        (evt.EVT_REQUESTED, gatekeeper.check),
        (evt.EVT_ACCEPTED, lambda event: associations.opened(event)),
        (evt.EVT_RELEASED, associations.closed, ["released"]),
        (evt.EVT_ABORTED, associations.closed, ["aborted"]),
        *(watchers or []),
    ]


def _prepare_connection(
    event: Event, acse_timeout: Callable[[], float | None], reactor_errors: ReactorErrors
) -> None:
    """Ready a new connection for the handover of its data phase (node/dataphase.py).

    pynetdicom's DUL thread polls the socket every 0.2 ms instead of 1 ms for
    associations it keeps (Storage Commitment reports). A peer that breaks the
    protocol before negotiating, or closes, releases its threads at once.
    """
    _shorter_dul_poll(event)
    if isinstance(getattr(event, "address", None), BalancerAddress):
        # Read by is_health_check; pynetdicom's Association has no place for our marks.
        event.assoc._dicom_node_health_check = True  # type: ignore[attr-defined]
    protect_acceptor(event.assoc, reactor_errors)
    dataphase.hold_at_established(event.assoc, acse_timeout() or 30.0)


class ReactorErrors:
    """Logs and counts associations aborted because pynetdicom's reactor raised."""

    def __init__(self, metrics: ReceiveMetrics | None) -> None:
        self._metrics = metrics

    def __call__(self, assoc: Any, exc: BaseException) -> None:
        address = getattr(assoc.requestor, "address", "?")
        log.warning(
            "aborting a connection from %s: it broke the protocol (%s: %s)",
            address,
            type(exc).__name__,
            str(exc)[:200],
        )
        if self._metrics is not None:
            self._metrics.protocol_error(type(exc).__name__)


def _shorter_dul_poll(event: Event) -> None:
    """Poll the socket every 0.2 ms instead of pynetdicom's 1 ms.

    Faster receiving, at the price of more CPU for an idle association
    (docs/decisions.md#d16).
    """
    shorter_dul_poll(event.assoc, DUL_POLL_SECONDS)


def _no_commitment_expected(event_type: int, info: Dataset | None) -> int:
    return PROCESSING_FAILURE
