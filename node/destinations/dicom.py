"""DICOM destination: a C-STORE SCU that drains the destination's outbox.

Each destination has its own sender threads (``max_associations``), so a dead peer
holds up nothing but itself. A sender claims the oldest due instances, proposes
for each SOP class the file's transfer syntax and (with ``fallback: uncompressed``)
Explicit and Implicit VR Little Endian in separate contexts, and sends what the
peer accepts, decompressing when the peer takes only uncompressed data.

An instance leaves the outbox only when the peer answered Success or a Warning
(delivered) or a failure that retrying cannot fix (moved to ``failed/``). With
``storage_commitment: true`` a stored instance stays until the peer commits it
(see :mod:`node.destinations.commitment`).
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom._config
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from node.config import ClientTls, DicomDestination
from node.destinations.commitment import PUSH_MODEL, Commitments, Reference, Transaction
from node.errors import DeliveryError
from node.outbox import Failure, Outbox, PeerState, Scheduler, Waker, arrival_time, backoff
from node.spool import Spool

log = logging.getLogger("dicom_node.dicom")

UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: context ids are odd numbers 1-255
POLL_SECONDS = 2.0  # idle re-scan, so that `dicom-node queue retry` is picked up
LINGER_SECONDS = 0.5  # keep an idle association open this long for new arrivals
# After an N-ACTION, keep the association open this long for a peer that sends its
# N-EVENT-REPORT on it; a peer that finds it released opens a new one (PS3.4 J.3.3).
COMMIT_LINGER_SECONDS = 2.0
# Failures that may pass by themselves (PS3.4 B.2.3, PS3.7 C): retried with backoff.
# 0x0110 "Processing failure" is what several archives answer when their disk fails.
TRANSIENT_STATUSES = frozenset({0x0110, 0x0213})


def _is_transient(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF or status in TRANSIENT_STATUSES


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Meta:
    """What negotiation needs to know about a pending file (its file meta)."""

    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


class Verdict(StrEnum):
    """What one C-STORE attempt means for the instance in the outbox."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retried with backoff
    PERMANENT = "permanent"  # to failed/ now: retrying cannot fix it
    GAVE_UP = "gave up"  # to failed/: waited past give_up_after


@dataclass(frozen=True)
class StoreResult:
    verdict: Verdict
    error: str = ""
    status: int | None = None
    comment: str = ""
    broken: bool = False  # the association is unusable afterwards


class AssociationFailed(Exception):
    """No association; ``permanent`` when the peer rejected it permanently."""

    def __init__(self, message: str, permanent: bool = False, no_contexts: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        # The peer answered but accepted none of the proposed presentation contexts.
        self.no_contexts = no_contexts


def judge(rsp: Dataset) -> StoreResult:
    """The C-STORE response's meaning for the outbox (PS3.4 Annex B)."""
    if "Status" not in rsp:
        return StoreResult(
            Verdict.TRANSIENT, "no C-STORE response (aborted or timed out)", broken=True
        )
    status = int(rsp.Status)
    comment = str(rsp.get("ErrorComment", "") or "")
    category = code_to_category(status)
    text = f"status 0x{status:04X} ({category.lower()})" + (f": {comment}" if comment else "")
    if category in ("Success", "Warning"):
        return StoreResult(Verdict.DELIVERED, text if status else "", status, comment)
    verdict = Verdict.TRANSIENT if _is_transient(status) else Verdict.PERMANENT
    return StoreResult(verdict, text, status, comment)


def decompressed(path: Path) -> Dataset:
    """The instance at ``path`` in Explicit VR Little Endian, SOP Instance UID kept.

    Every decoder plugin is tried in turn: pydicom 3.0.2 with the gdcm plugin fails
    on signed data with Bits Stored < Bits Allocated ("output array is read-only").
    """
    ds = pydicom.dcmread(path)
    plugins = [""] + sorted(get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins)
    problem: Exception | None = None
    for plugin in plugins:
        try:
            # Every destination must hold the same instance: keep the SOP Instance UID.
            ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
            return ds
        except Exception as exc:  # noqa: BLE001 - each plugin fails its own way
            problem = problem or exc
            ds = pydicom.dcmread(path)
    raise ValueError(f"no decoder could decompress it: {problem}")


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
    """Nagle's algorithm off: otherwise each C-STORE can wait ~40 ms for a delayed ACK."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def keep_responses_from_the_reactor(assoc: Association) -> None:
    """Guard a requestor's association against a pynetdicom race that loses a response.

    pynetdicom 3.0's reactor thread takes requests from the peer off the DIMSE queue;
    ``send_c_store`` and the other ``send_*`` pause it (clear a checkpoint, wait until
    it says paused) and then wait on the same queue for their response. A reactor that
    has just passed the checkpoint when the pause starts can still take the response:
    it logs "Received unexpected C-STORE service message" and drops it, and the sender
    waits out the DIMSE timeout, then aborts the association. The benchmark's timed
    pynetdicom sender hit this twice in about 18,000 C-STOREs (a 60 s stall each).
    Here a response the reactor takes while a request is waiting for it (checkpoint
    cleared) goes back on the queue. Private pynetdicom API, like ``Handover`` in
    :mod:`node.dataphase`: one reason pynetdicom is pinned below 3.1.
    """
    serve_request = assoc._serve_request

    def serve_or_put_back(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(msg, context_id)

    assoc._serve_request = serve_or_put_back  # type: ignore[method-assign]


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


# --------------------------------------------------------------------------- runner


class DicomRunner:
    """Sends one DICOM destination's outbox; see the module docstring."""

    def __init__(self, dest: DicomDestination, spool: Spool) -> None:
        self.dest = dest
        self.outbox = Outbox(spool, dest.name)
        self.scheduler = Scheduler(self.outbox, dest.retry)
        self.waker = Waker()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._metas: dict[str, Meta | None] = {}
        self._peer = PeerState()
        self._fallback_logged: set[str] = set()
        self._active: set[Association] = set()
        self.commitments: Commitments | None = None
        if dest.storage_commitment:
            self.commitments = Commitments(
                self.outbox.pending.parent / "commit",
                dest.name,
                dest.commitment_timeout,
                committed=self._committed,
                not_committed=self._not_committed,
            )

    # ---------------------------------------------------------------- Runner protocol

    def start(self) -> None:
        # Send files as they are on disk, without decoding them: pynetdicom streams
        # them in PDU-sized chunks (a process-wide switch; the node sends no other
        # C-STORE by path, and data sets passed as objects are still encoded).
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
        self.outbox.create()
        self._peer = self.outbox.read_peer()
        if self.commitments is not None:
            # Stored before a restart, still awaiting the peer's report: not sent again yet.
            self.scheduler.hold(self.commitments.load())
        for n in range(self.dest.max_associations):
            thread = threading.Thread(
                target=self._sender, name=f"send-{self.dest.name}-{n}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def notify(self) -> None:
        self.waker.notify()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.waker.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        with self._lock:
            for assoc in list(self._active):
                assoc.abort()

    # ---------------------------------------------------------------- sender thread

    def _sender(self) -> None:
        ae = new_ae(self.dest)
        while not self._stopping.is_set():
            seen = self.waker.mark()
            if self.commitments is not None:
                self.commitments.expire()
            wait = self._peer_wait()
            if wait > 0:
                self.waker.wait(seen, min(wait, POLL_SECONDS))
                continue
            plan = self._plan()
            batch, next_due = self.scheduler.claim(self._batch_limit(), self._fits(plan))
            if not batch:
                self.waker.wait(seen, min(next_due, POLL_SECONDS))
                continue
            try:
                self._session(ae, plan, batch)
            except Exception:  # noqa: BLE001 - a bug must not silently stop the destination
                log.exception("%s: unexpected error while sending; retrying later", self.dest.name)
                self._stopping.wait(1.0)
            finally:
                self.scheduler.release(batch)

    def _plan(self) -> ContextPlan:
        # One context id is kept for Storage Commitment when it is wanted.
        reserved = 1 if self.commitments is not None else 0
        return ContextPlan(self.dest.fallback, MAX_CONTEXTS - reserved)

    def _batch_limit(self) -> int:
        n = self.dest.max_associations
        if n == 1:
            return self.dest.instances_per_association
        # Spread a small backlog over the parallel associations.
        due = self.scheduler.due_count()
        return max(1, min(self.dest.instances_per_association, math.ceil(due / n)))

    def _fits(self, plan: ContextPlan):  # type: ignore[no-untyped-def]
        def accept(item_id: str) -> bool:
            meta = self._meta(item_id)
            return meta is None or plan.add(meta)

        return accept

    def _session(self, ae: AE, plan: ContextPlan, batch: list[str]) -> None:
        """One association: the batch, then whatever else arrives that it can carry."""
        unreadable = [i for i in batch if self._meta(i) is None]
        for item_id in unreadable:
            self._settle(item_id, StoreResult(Verdict.PERMANENT, "not a readable DICOM file"))
        batch = [i for i in batch if i not in unreadable]
        if not batch:
            return
        contexts, handlers = plan.contexts(), []
        if self.commitments is not None:
            contexts.append(build_context(PUSH_MODEL))
            # A peer may send the N-EVENT-REPORT on this very association.
            handlers.append((evt.EVT_N_EVENT_REPORT, self._event_report))
        try:
            assoc = associate(ae, self.dest, contexts, handlers)
        except AssociationFailed as exc:
            self._association_failed(batch, exc)
            return
        with self._lock:
            self._active.add(assoc)
        self._peer_ok()
        room = self.dest.instances_per_association
        stored: dict[str, Reference] = {}
        try:
            queue = batch
            while queue:
                try:
                    if not self._send_all(assoc, queue, stored):
                        return
                finally:
                    self.scheduler.release(queue)
                room -= len(queue)
                queue = self._more(plan, room) if room > 0 else []
        finally:
            if stored:
                self._request_commitment(assoc, stored)
            with self._lock:
                self._active.discard(assoc)
            if assoc.is_established:
                assoc.release()

    def _send_all(self, assoc: Association, queue: list[str], stored: dict[str, Reference]) -> bool:
        """Send ``queue`` on ``assoc``; False if the association is no longer usable.

        Instances stored while commitment is wanted are added to ``stored``.
        """
        for item_id in queue:
            if self._stopping.is_set() or not assoc.is_established:
                return False
            result = self._store(assoc, item_id)
            if result.verdict is Verdict.DELIVERED and self.commitments is not None:
                stored[item_id] = self._stored(item_id, result)
                continue
            self._settle(item_id, result)
            if result.broken:
                self._peer_failed(result.error)
                return False
        return True

    def _more(self, plan: ContextPlan, limit: int) -> list[str]:
        """Instances the open association can carry, waiting briefly for new ones."""
        deadline = time.monotonic() + LINGER_SECONDS
        while not self._stopping.is_set():
            seen = self.waker.mark()
            more, _ = self.scheduler.claim(limit, self._covered(plan))
            left = deadline - time.monotonic()
            if more or left <= 0:
                return more
            self.waker.wait(seen, left)
        return []

    def _covered(self, plan: ContextPlan):  # type: ignore[no-untyped-def]
        def accept(item_id: str) -> bool:
            meta = self._meta(item_id)
            return meta is not None and plan.covers(meta)

        return accept

    # ---------------------------------------------------------------- one instance

    def _store(self, assoc: Association, item_id: str) -> StoreResult:
        meta = self._meta(item_id)
        assert meta is not None  # unreadable files never reach an association
        path = self.outbox.pending_path(item_id)
        accepted = {
            UID(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == meta.sop_class
        }
        uncompressed = accepted & set(UNCOMPRESSED)
        try:
            if meta.transfer_syntax in accepted:
                rsp = assoc.send_c_store(path)
            elif meta.transfer_syntax in UNCOMPRESSED and uncompressed:
                # pynetdicom converts between explicit and implicit VR for us.
                rsp = assoc.send_c_store(pydicom.dcmread(path))
            elif self.dest.fallback == "uncompressed" and uncompressed:
                rsp = assoc.send_c_store(self._decompressed(path, meta))
            else:
                return StoreResult(Verdict.PERMANENT, self._not_accepted(meta, accepted))
        except (RuntimeError, ConnectionError) as exc:
            return StoreResult(Verdict.TRANSIENT, f"association lost: {exc}", broken=True)
        except OSError as exc:
            return StoreResult(Verdict.TRANSIENT, f"cannot read {path.name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - decoding errors of every codec
            return StoreResult(Verdict.PERMANENT, f"cannot decompress for the peer: {exc}")
        return judge(rsp)

    def _decompressed(self, path: Path, meta: Meta) -> Dataset:
        if meta.sop_class not in self._fallback_logged:
            self._fallback_logged.add(meta.sop_class)
            log.warning(
                "%s: peer accepts %s only uncompressed; sending %s decompressed "
                "(logged once per SOP class)",
                self.dest.name,
                meta.sop_class.name,
                meta.transfer_syntax.name,
            )
        return decompressed(path)

    def _not_accepted(self, meta: Meta, accepted: set[UID]) -> str:
        offered = ", ".join(ts.name for _, ts in ContextPlan(self.dest.fallback).wanted(meta))
        if not accepted:
            return (
                f"peer accepted no presentation context for {meta.sop_class.name} "
                f"({meta.sop_class}) offered as {offered} (fallback: {self.dest.fallback})"
            )
        return (
            f"peer accepts {meta.sop_class.name} only as "
            f"{', '.join(sorted(ts.name for ts in accepted))}, not {offered} "
            f"(fallback: {self.dest.fallback})"
        )

    def _settle(self, item_id: str, result: StoreResult) -> None:
        meta = self._metas.get(item_id)
        uid = str(meta.sop_instance) if meta else ""
        if result.verdict is Verdict.DELIVERED:
            if result.status:
                log.info("%s: %s delivered with %s", self.dest.name, uid, result.error)
            else:
                log.debug("%s: %s delivered", self.dest.name, uid)
            self.scheduler.delivered(item_id)
            self._forget(item_id)
            return
        if result.verdict is Verdict.TRANSIENT and self.scheduler.transient(item_id, result.error):
            log.warning("%s: %s not delivered, will retry: %s", self.dest.name, uid, result.error)
            return
        failure = Failure(
            error=result.error,
            status=result.status,
            error_comment=result.comment,
            permanent=result.verdict is Verdict.PERMANENT,
        )
        log.error("%s: %s moved to failed/: %s", self.dest.name, uid, result.error)
        self.scheduler.fail(item_id, failure, uid)
        self._forget(item_id)

    def _meta(self, item_id: str) -> Meta | None:
        with self._lock:
            if item_id in self._metas:
                return self._metas[item_id]
        try:
            fm = read_file_meta_info(self.outbox.pending_path(item_id))
            meta: Meta | None = Meta(
                UID(fm.MediaStorageSOPClassUID),
                UID(fm.MediaStorageSOPInstanceUID),
                UID(fm.TransferSyntaxUID),
            )
        except Exception:  # noqa: BLE001 - any unreadable meta makes the file unsendable
            meta = None
        with self._lock:
            self._metas[item_id] = meta
        return meta

    def _forget(self, item_id: str) -> None:
        with self._lock:
            self._metas.pop(item_id, None)

    # ---------------------------------------------------------------- storage commitment

    def _stored(self, item_id: str, result: StoreResult) -> Reference:
        """Stored, now awaiting commitment: held back from sending, kept in the outbox."""
        meta = self._meta(item_id)
        assert meta is not None  # unreadable files never reach an association
        self.scheduler.hold([item_id])
        log.debug("%s: %s stored %s", self.dest.name, meta.sop_instance, result.error)
        return Reference(str(meta.sop_class), str(meta.sop_instance))

    def _request_commitment(self, assoc: Association, stored: dict[str, Reference]) -> None:
        """Ask the peer to commit ``stored``, on the association that carried them."""
        assert self.commitments is not None
        txn = self.commitments.open(stored)
        context_id = _context_id(assoc, PUSH_MODEL)
        if not assoc.is_established:
            error = "association lost before storage commitment could be requested"
        else:
            try:
                error = self.commitments.request(assoc, context_id, txn)
            except Exception as exc:  # noqa: BLE001 - the instances must not wait for nothing
                log.exception("%s: storage commitment request failed", self.dest.name)
                error = f"storage commitment request failed: {exc}"
        if error:
            self.commitments.abandon(txn, error)
            return
        self._linger_for_report(assoc, txn)

    def _linger_for_report(self, assoc: Association, txn: Transaction) -> None:
        assert self.commitments is not None
        deadline = time.monotonic() + min(COMMIT_LINGER_SECONDS, self.dest.timeout)
        while (
            self.commitments.knows(txn.uid)
            and assoc.is_established
            and not self._stopping.is_set()
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)

    def _event_report(self, event: Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT on the sending association: settle, then answer."""
        assert self.commitments is not None
        event_type = int(event.request.EventTypeID)
        return self.commitments.report(event_type, event.event_information), None

    def _committed(self, item_id: str) -> None:
        self.scheduler.delivered(item_id)
        self._forget(item_id)

    def _not_committed(self, item_id: str, reason: str) -> None:
        """Back to the retry schedule: sent again, or to failed/ after give_up_after."""
        self.scheduler.unhold([item_id])
        if not self.outbox.pending_path(item_id).exists():
            return  # removed meanwhile (e.g. by an operator)
        self._meta(item_id)
        self._settle(item_id, StoreResult(Verdict.TRANSIENT, reason))
        self.waker.notify()

    # ---------------------------------------------------------------- the peer

    def _peer_wait(self) -> float:
        with self._lock:
            return self._peer.next_attempt - time.time()

    def _peer_ok(self) -> None:
        with self._lock:
            if self._peer.failures == 0:
                return
            log.info(
                "%s: peer reachable again after %d failed attempt(s)",
                self.dest.name,
                self._peer.failures,
            )
            self._peer = PeerState()
            self.outbox.save_peer(self._peer)

    def _peer_failed(self, error: str) -> None:
        now = time.time()
        with self._lock:
            peer = self._peer
            failures = peer.failures + 1
            self._peer = PeerState(
                failures=failures,
                down_since=peer.down_since if peer.down_since is not None else now,
                next_attempt=now + backoff(self.dest.retry, failures),
                last_error=error,
            )
            self.outbox.save_peer(self._peer)
            wait = self._peer.next_attempt - now
        log.warning("%s: %s; next attempt in %.1f s", self.dest.name, error, wait)

    def _association_failed(self, batch: list[str], exc: AssociationFailed) -> None:
        if exc.no_contexts:
            for item_id in batch:
                meta = self._meta(item_id)
                assert meta is not None  # unreadable files never reach an association
                self._settle(
                    item_id, StoreResult(Verdict.PERMANENT, self._not_accepted(meta, set()))
                )
            return
        if exc.permanent:
            # The peer will not talk to us as configured (e.g. called AE title not
            # recognised); waiting will not change that, the operator must.
            for item_id in batch:
                self._settle(item_id, StoreResult(Verdict.PERMANENT, str(exc)))
            return
        self._peer_failed(str(exc))
        self._give_up_overdue(batch)

    def _give_up_overdue(self, batch: list[str]) -> None:
        """During a long outage, move instances that waited past give_up_after to failed/.

        An instance's clock starts when it arrived or when the outage began, whichever
        is later; the batch in hand is checked, then everything else pending.
        """
        with self._lock:
            since = self._peer.down_since
            error = self._peer.last_error
        if since is None:
            return
        now = time.time()
        limit = self.dest.retry.give_up_after

        def overdue(item_id: str) -> bool:
            return now - max(arrival_time(item_id), since) >= limit

        others, _ = self.scheduler.claim(10_000, overdue)
        reason = f"peer unreachable since {time.ctime(since)}: {error}"
        try:
            for item_id in [i for i in batch if overdue(i)] + others:
                self._meta(item_id)
                self._settle(item_id, StoreResult(Verdict.GAVE_UP, reason))
        finally:
            self.scheduler.release(others)


def _context_id(assoc: Association, abstract_syntax: UID) -> int | None:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == abstract_syntax:
            return cx.context_id
    return None


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
