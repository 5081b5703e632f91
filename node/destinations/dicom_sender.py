"""The DICOM destination's runner: C-STORE SCU threads that drain its outbox.

Each destination has its own sender threads (``max_associations``), so a dead peer
holds up nothing but itself. A sender claims the oldest due instances, proposes
for each SOP class the file's transfer syntax and (with ``fallback: uncompressed``)
Explicit and Implicit VR Little Endian in separate contexts, and sends what the
peer accepts, decompressing when the peer takes only uncompressed data.

An instance leaves the outbox only when the peer answered Success or a Warning
(delivered) or a failure that retrying cannot fix (moved to ``failed/``). With
``storage_commitment: true`` a stored instance stays until the peer commits it
(:class:`~node.destinations.commitment.CommitmentFlow`). Whether the peer is worth
trying at all is :class:`~node.destinations.peer.PeerHealth`'s business.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.status import code_to_category

from node.destinations import Runner
from node.destinations.commitment import CommitmentFlow, Reference
from node.destinations.dicom import DicomDestination
from node.destinations.dicom_net import (
    MAX_CONTEXTS,
    UNCOMPRESSED,
    AssociationFailed,
    ContextPlan,
    Meta,
    associate,
    new_ae,
)
from node.destinations.dicom_wire import NotAPart10File, WireAssociation
from node.destinations.peer import PeerHealth
from node.outbox import Failure, Outbox, Scheduler, Waker, arrival_time
from node.pynetdicom_private import end_taken_over, send_files_as_they_are, take_over_socket
from node.spool import Spool

log = logging.getLogger("dicom_node.dicom")

POLL_SECONDS = 2.0  # idle re-scan, so that `dicom-node queue retry` is picked up
LINGER_SECONDS = 0.5  # keep an idle association open this long for new arrivals
TAKE_OVER_SECONDS = 5.0  # for pynetdicom's threads to let go of a new association
# Failures that may pass by themselves (PS3.4 B.2.3, PS3.7 C): retried with backoff.
# 0x0110 "Processing failure" is what several archives answer when their disk fails.
TRANSIENT_STATUSES = frozenset({0x0110, 0x0213})


def _is_transient(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF or status in TRANSIENT_STATUSES


# --------------------------------------------------------------------------- values


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


def status_dataset(status: int, comment: str) -> Dataset:
    """A C-STORE response's status as pynetdicom would give it, for :func:`judge`."""
    rsp = Dataset()
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    return rsp


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


# --------------------------------------------------------------------------- runner


class DicomRunner(Runner):
    """Sends one DICOM destination's outbox; see the module docstring."""

    def __init__(self, dest: DicomDestination, spool: Spool) -> None:
        self.dest = dest
        self.outbox = Outbox(spool, dest.name)
        self.scheduler = Scheduler(self.outbox, dest.retry)
        self.waker = Waker()
        self.peer = PeerHealth(dest.name, self.outbox, dest.retry)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._metas: dict[str, Meta | None] = {}
        self._fallback_logged: set[str] = set()
        self._active: set[Association] = set()
        self._wires: dict[int, WireAssociation] = {}  # by id() of the association
        self.commitment: CommitmentFlow | None = None
        if dest.storage_commitment:
            self.commitment = CommitmentFlow(
                self.outbox.pending.parent / "commit",
                dest.name,
                dest.commitment_timeout,
                linger=dest.timeout,
                scheduler=self.scheduler,
                committed=self._committed,
                not_committed=self._not_committed,
                stopping=self._stopping,
            )

    # ---------------------------------------------------------------- Runner protocol

    def start(self) -> None:
        # Send files as they are on disk, without decoding them.
        send_files_as_they_are()
        self.outbox.create()
        self.peer.load()
        if self.commitment is not None:
            self.commitment.load()
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
                wire = self._wires.get(id(assoc))
                if wire is not None:
                    wire.abort()
                else:
                    assoc.abort()

    def commitment_report(self, transaction_uid: str, event_type: int, info: Any) -> int | None:
        if self.commitment is None:
            return None
        return self.commitment.report_for(transaction_uid, event_type, info)

    # ---------------------------------------------------------------- sender thread

    def _sender(self) -> None:
        ae = new_ae(self.dest)
        while not self._stopping.is_set():
            seen = self.waker.mark()
            if self.commitment is not None:
                self.commitment.expire()
            wait = self.peer.wait()
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
        reserved = 0 if self.commitment is None else self.commitment.RESERVED_CONTEXTS
        return ContextPlan(self.dest.fallback, MAX_CONTEXTS - reserved)

    def _batch_limit(self) -> int:
        n = self.dest.max_associations
        if n == 1:
            return self.dest.instances_per_association
        # Spread a small backlog over the parallel associations.
        due = self.scheduler.due_count()
        return max(1, min(self.dest.instances_per_association, math.ceil(due / n)))

    def _fits(self, plan: ContextPlan) -> Callable[[str], bool]:
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
        if self.commitment is not None:
            contexts.append(self.commitment.context())
            handlers.append(self.commitment.report_handler())
        try:
            assoc = associate(ae, self.dest, contexts, handlers)
        except AssociationFailed as exc:
            self._association_failed(batch, exc)
            return
        wire = self._take_over(assoc)
        with self._lock:
            self._active.add(assoc)
            if wire is not None:
                self._wires[id(assoc)] = wire
        self.peer.ok()
        room = self.dest.instances_per_association
        stored: dict[str, Reference] = {}
        try:
            queue = batch
            while queue:
                try:
                    if not self._send_all(assoc, queue, stored, wire):
                        return
                finally:
                    self.scheduler.release(queue)
                room -= len(queue)
                queue = self._more(plan, room) if room > 0 else []
        finally:
            if stored and self.commitment is not None:
                self.commitment.request(assoc, stored)
            with self._lock:
                self._active.discard(assoc)
                self._wires.pop(id(assoc), None)
            if wire is not None:
                end_taken_over(assoc, released=wire.open and wire.release())
            elif assoc.is_established:
                assoc.release()

    def _take_over(self, assoc: Association) -> WireAssociation | None:
        """The association's data phase on the socket (dicom_wire), if it can be.

        Not over TLS, and not with Storage Commitment, whose N-ACTION and reports go
        through pynetdicom on the same association.
        """
        if self.dest.tls is not None or self.commitment is not None:
            return None
        sock = take_over_socket(assoc, TAKE_OVER_SECONDS)
        if sock is None:
            return None
        return WireAssociation(sock, int(assoc.acceptor.maximum_length or 0), self.dest.timeout)

    def _send_all(
        self,
        assoc: Association,
        queue: list[str],
        stored: dict[str, Reference],
        wire: WireAssociation | None,
    ) -> bool:
        """Send ``queue`` on ``assoc``; False if the association is no longer usable.

        Instances stored while commitment is wanted are added to ``stored``.
        """
        for n, item_id in enumerate(queue):
            usable = wire.open if wire is not None else assoc.is_established
            if self._stopping.is_set() or not usable:
                return False
            if wire is not None and n + 1 < len(queue):
                wire.read_ahead = self.outbox.pending_path(queue[n + 1])
            result = self._store(assoc, item_id, wire)
            if result.verdict is Verdict.DELIVERED and self.commitment is not None:
                stored[item_id] = self.commitment.stored(item_id, self._reference(item_id, result))
                continue
            self._settle(item_id, result)
            if result.broken:
                self.peer.failed(result.error)
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

    def _covered(self, plan: ContextPlan) -> Callable[[str], bool]:
        def accept(item_id: str) -> bool:
            meta = self._meta(item_id)
            return meta is not None and plan.covers(meta)

        return accept

    # ---------------------------------------------------------------- one instance

    def _store(
        self, assoc: Association, item_id: str, wire: WireAssociation | None = None
    ) -> StoreResult:
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
            if wire is not None:
                return self._store_on_wire(wire, assoc, path, meta, accepted)
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
        except NotAPart10File as exc:
            return StoreResult(Verdict.PERMANENT, str(exc))
        except OSError as exc:
            return StoreResult(Verdict.TRANSIENT, f"cannot read {path.name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - decoding errors of every codec
            return StoreResult(Verdict.PERMANENT, f"cannot decompress for the peer: {exc}")
        return judge(rsp)

    def _store_on_wire(
        self,
        wire: WireAssociation,
        assoc: Association,
        path: Path,
        meta: Meta,
        accepted: set[UID],
    ) -> StoreResult:
        """:meth:`_store` on a taken-over association: the file as it is if the peer
        takes its syntax, else re-encoded (or decompressed) in an uncompressed one."""
        contexts = {
            (UID(str(cx.abstract_syntax)), UID(cx.transfer_syntax[0])): int(cx.context_id or 0)
            for cx in assoc.accepted_contexts
        }
        if meta.transfer_syntax in accepted:
            context_id = contexts[(meta.sop_class, meta.transfer_syntax)]
            status, comment = wire.store_file(context_id, meta.sop_class, meta.sop_instance, path)
            return judge(status_dataset(status, comment))
        uncompressed = [ts for ts in UNCOMPRESSED if ts in accepted]
        if not uncompressed:
            return StoreResult(Verdict.PERMANENT, self._not_accepted(meta, accepted))
        ds: Dataset
        if meta.transfer_syntax in UNCOMPRESSED:
            ds = pydicom.dcmread(path)
        elif self.dest.fallback == "uncompressed":
            ds = self._decompressed(path, meta)
        else:
            return StoreResult(Verdict.PERMANENT, self._not_accepted(meta, accepted))
        syntax = uncompressed[0]  # Explicit VR Little Endian first
        data = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
        if data is None:
            return StoreResult(Verdict.PERMANENT, f"cannot encode the instance as {syntax.name}")
        context_id = contexts[(meta.sop_class, syntax)]
        status, comment = wire.store_bytes(context_id, meta.sop_class, meta.sop_instance, data)
        return judge(status_dataset(status, comment))

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

    def _reference(self, item_id: str, result: StoreResult) -> Reference:
        meta = self._meta(item_id)
        assert meta is not None  # unreadable files never reach an association
        log.debug("%s: %s stored %s", self.dest.name, meta.sop_instance, result.error)
        return Reference(str(meta.sop_class), str(meta.sop_instance))

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
        self.peer.failed(str(exc))
        self._give_up_overdue(batch)

    def _give_up_overdue(self, batch: list[str]) -> None:
        """During a long outage, move instances that waited past give_up_after to failed/.

        An instance's clock starts when it arrived or when the outage began, whichever
        is later; the batch in hand is checked, then everything else pending.
        """
        since, error = self.peer.outage()
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
