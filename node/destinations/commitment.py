"""Storage Commitment (PS3.4 Annex J, Push Model) for a DICOM destination, as SCU.

After a batch is stored, the runner opens a *transaction*: its file
``<spool>/destinations/<name>/commit/<transaction uid>.json`` lists the batch's outbox
ids, and is written durably *before* the N-ACTION goes out, because the peer may
answer (N-EVENT-REPORT, on the same or on a new association) before the N-ACTION
response is even read. Until the report comes, the instances stay in ``pending/``,
held back from sending.

The report settles the transaction: committed instances leave the outbox; those
reported failed, or missing from the report, are "not committed" and go back to
the retry schedule (sent again, and after ``give_up_after`` moved to ``failed/``).
A transaction without a report after ``commitment_timeout`` (also across restarts:
the deadline is in the file) is settled the same way: every instance is sent again
and a new commitment is requested, so nothing is lost to a peer that forgot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from node.fsutil import TMP_SUFFIX, makedirs_durably, write_durably
from node.outbox import Scheduler

log = logging.getLogger("dicom_node.commitment")

PUSH_MODEL = UID("1.2.840.10008.1.20.1")  # Storage Commitment Push Model SOP Class
PUSH_MODEL_INSTANCE = UID("1.2.840.10008.1.20.1.1")  # its well-known SOP Instance
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)
SOME_FAILED = 2
# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8).
SUCCESS = 0x0000
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT = 0x0115
# Failure Reason (0008,1197) values, PS3.4 J.3.3.1.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0xA7FE: "resource limitation",
}

Committed = Callable[[str], None]
NotCommitted = Callable[[str, str], None]


@dataclass(frozen=True)
class Reference:
    sop_class: str
    sop_instance: str


@dataclass(frozen=True)
class Transaction:
    uid: str
    created: float
    deadline: float
    items: dict[str, Reference]  # outbox id -> what the peer is asked to commit

    def to_json(self) -> bytes:
        raw = {
            "transaction_uid": self.uid,
            "created": self.created,
            "deadline": self.deadline,
            "items": {i: [r.sop_class, r.sop_instance] for i, r in self.items.items()},
        }
        return json.dumps(raw, indent=1, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Transaction:
        return cls(
            uid=str(raw["transaction_uid"]),
            created=float(raw["created"]),
            deadline=float(raw["deadline"]),
            items={str(i): Reference(str(c), str(s)) for i, (c, s) in raw["items"].items()},
        )


def action_information(txn: Transaction) -> Dataset:
    """The N-ACTION Action Information (PS3.4 J.3.2.1)."""
    ds = Dataset()
    ds.TransactionUID = txn.uid
    ds.ReferencedSOPSequence = [_reference(r) for r in txn.items.values()]
    return ds


def _reference(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class
    item.ReferencedSOPInstanceUID = ref.sop_instance
    return item


def failure_text(code: int | None) -> str:
    if code is None:
        return "no failure reason given"
    return f"failure reason 0x{code:04X} ({FAILURE_REASONS.get(code, 'unknown')})"


class Commitments:
    """One destination's open transactions: on disk, and in memory by transaction UID."""

    def __init__(
        self,
        folder: Path,
        destination: str,
        timeout: float,
        committed: Committed,
        not_committed: NotCommitted,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = folder
        self.destination = destination
        self.timeout = timeout
        self._committed = committed
        self._not_committed = not_committed
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, Transaction] = {}

    # ---------------------------------------------------------------- lifecycle

    def load(self) -> list[str]:
        """Read the transactions an earlier run left open; the outbox ids they hold."""
        makedirs_durably(self.folder)
        for tmp in self.folder.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
        held: list[str] = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                txn = Transaction.from_json(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Its instances are simply sent again: they were never removed.
                log.warning("%s: ignoring unreadable %s: %s", self.destination, path.name, exc)
                path.unlink(missing_ok=True)
                continue
            with self._lock:
                self._open[txn.uid] = txn
            held += txn.items
        if held:
            log.info(
                "%s: %d instance(s) still await storage commitment", self.destination, len(held)
            )
        return held

    def open(self, items: dict[str, Reference]) -> Transaction:
        """A new transaction, durable on disk before anything is sent to the peer."""
        now = self._clock()
        txn = Transaction(generate_uid(), now, now + self.timeout, dict(items))
        write_durably(self._path(txn.uid), [txn.to_json()])
        with self._lock:
            self._open[txn.uid] = txn
        return txn

    def knows(self, transaction_uid: str) -> bool:
        with self._lock:
            return transaction_uid in self._open

    def pending_count(self) -> int:
        with self._lock:
            return sum(len(t.items) for t in self._open.values())

    # ---------------------------------------------------------------- requesting

    def request(self, assoc: Association, context_id: int | None, txn: Transaction) -> str:
        """Send the N-ACTION; "" on success, else why the request failed."""
        if context_id is None:
            return "the peer did not accept the Storage Commitment Push Model SOP class"
        try:
            status, _ = assoc.send_n_action(
                action_information(txn),
                REQUEST_COMMITMENT,
                PUSH_MODEL,
                PUSH_MODEL_INSTANCE,
            )
        except (RuntimeError, ConnectionError, ValueError) as exc:
            return f"storage commitment request failed: {exc}"
        if "Status" not in status:
            return "no N-ACTION response (association aborted or timed out)"
        code = int(status.Status)
        if code != SUCCESS:
            comment = str(status.get("ErrorComment", "") or "")
            return f"storage commitment refused: N-ACTION status 0x{code:04X} {comment}".strip()
        log.debug(
            "%s: storage commitment %s requested for %d instance(s)",
            self.destination,
            txn.uid,
            len(txn.items),
        )
        return ""

    # ---------------------------------------------------------------- settling

    def report(self, event_type: int, info: Dataset | None) -> int:
        """Settle a transaction from the peer's N-EVENT-REPORT; the status to answer."""
        if event_type not in (ALL_COMMITTED, SOME_FAILED):
            return NO_SUCH_EVENT_TYPE
        uid = transaction_uid(info)
        with self._lock:
            txn = self._open.pop(uid, None)
        if txn is None:
            return INVALID_ARGUMENT
        assert info is not None
        committed = {
            str(i.ReferencedSOPInstanceUID) for i in _sequence(info, "ReferencedSOPSequence")
        }
        failed = {
            str(i.ReferencedSOPInstanceUID): _failure_reason(i)
            for i in _sequence(info, "FailedSOPSequence")
        }
        done = 0
        for item_id, ref in txn.items.items():
            if ref.sop_instance in committed and ref.sop_instance not in failed:
                self._committed(item_id)
                done += 1
            elif ref.sop_instance in failed:
                self._not_committed(
                    item_id, f"peer did not commit it: {failure_text(failed[ref.sop_instance])}"
                )
            else:
                self._not_committed(item_id, "peer's commitment report did not mention it")
        # Last: a crash before this line replays the transaction after its deadline.
        self._path(uid).unlink(missing_ok=True)
        log.info(
            "%s: storage commitment %s: %d of %d instance(s) committed",
            self.destination,
            uid,
            done,
            len(txn.items),
        )
        return SUCCESS

    def abandon(self, txn: Transaction, reason: str) -> None:
        """No commitment for ``txn``: its instances are sent again."""
        with self._lock:
            if self._open.pop(txn.uid, None) is None:
                return  # settled by a report meanwhile
        log.warning(
            "%s: storage commitment %s for %d instance(s): %s; sending them again",
            self.destination,
            txn.uid,
            len(txn.items),
            reason,
        )
        for item_id in txn.items:
            self._not_committed(item_id, reason)
        self._path(txn.uid).unlink(missing_ok=True)

    def expire(self) -> None:
        """Abandon transactions whose report did not come within ``commitment_timeout``."""
        now = self._clock()
        with self._lock:
            overdue = [t for t in self._open.values() if t.deadline <= now]
        for txn in overdue:
            waited = now - txn.created
            self.abandon(txn, f"no storage commitment report within {waited:.0f} s")

    def _path(self, uid: str) -> Path:
        return self.folder / f"{uid}.json"


def _sequence(ds: Dataset, keyword: str) -> Iterable[Dataset]:
    return ds.get(keyword) or []


def _failure_reason(item: Dataset) -> int | None:
    value = item.get("FailureReason")
    return None if value is None else int(value)


def transaction_uid(info: Dataset | None) -> str:
    return str(getattr(info, "TransactionUID", "") or "")


# --------------------------------------------------------------------------- the flow

# After an N-ACTION, keep the association open this long for a peer that sends its
# N-EVENT-REPORT on it; a peer that finds it released opens a new one (PS3.4 J.3.3).
COMMIT_LINGER_SECONDS = 2.0


class CommitmentFlow:
    """A DICOM destination's side of Storage Commitment, around its sender's batches.

    The sender tells it what each association stored (:meth:`stored`) and hands it
    the association at the end (:meth:`request`); it holds those instances back from
    sending, asks the peer to commit them and settles them through ``committed`` and
    ``not_committed`` when the report comes (on that association, or through the
    node's SCP: :meth:`report_for`), or when it does not come in time (:meth:`expire`).
    """

    # One presentation context id is kept for the Push Model on every association.
    RESERVED_CONTEXTS = 1

    def __init__(
        self,
        folder: Path,
        destination: str,
        timeout: float,
        linger: float,
        scheduler: Scheduler,
        committed: Committed,
        not_committed: NotCommitted,
        stopping: threading.Event,
    ) -> None:
        self.destination = destination
        self.linger = min(COMMIT_LINGER_SECONDS, linger)
        self.scheduler = scheduler
        self.stopping = stopping
        self.store = Commitments(folder, destination, timeout, committed, not_committed)

    def load(self) -> None:
        """Stored before a restart, still awaiting the peer's report: not sent again yet."""
        self.scheduler.hold(self.store.load())

    def expire(self) -> None:
        self.store.expire()

    def context(self) -> PresentationContext:
        return build_context(PUSH_MODEL)

    def report_handler(self) -> tuple[evt.EventType, Callable[[Event], tuple[int, None]]]:
        """A peer may send the N-EVENT-REPORT on the association that stored the batch."""
        return evt.EVT_N_EVENT_REPORT, self._event_report

    def stored(self, item_id: str, reference: Reference) -> Reference:
        """Stored, now awaiting commitment: held back from sending, kept in the outbox."""
        self.scheduler.hold([item_id])
        return reference

    def request(self, assoc: Association, stored: dict[str, Reference]) -> None:
        """Ask the peer to commit ``stored``, on the association that carried them."""
        txn = self.store.open(stored)
        context_id = _context_id(assoc, PUSH_MODEL)
        if not assoc.is_established:
            error = "association lost before storage commitment could be requested"
        else:
            try:
                error = self.store.request(assoc, context_id, txn)
            except Exception as exc:  # noqa: BLE001 - the instances must not wait for nothing
                log.exception("%s: storage commitment request failed", self.destination)
                error = f"storage commitment request failed: {exc}"
        if error:
            self.store.abandon(txn, error)
            return
        self._linger_for_report(assoc, txn)

    def report_for(self, transaction_uid: str, event_type: int, info: Dataset | None) -> int | None:
        """A report that reached the node's SCP: the status to answer, None if not ours."""
        if not self.store.knows(transaction_uid):
            return None
        return self.store.report(event_type, info)

    def _linger_for_report(self, assoc: Association, txn: Transaction) -> None:
        deadline = time.monotonic() + self.linger
        while (
            self.store.knows(txn.uid)
            and assoc.is_established
            and not self.stopping.is_set()
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)

    def _event_report(self, event: Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT on the sending association: settle, then answer."""
        request = cast(N_EVENT_REPORT, event.request)
        event_type = int(cast(int, request.EventTypeID))
        return self.store.report(event_type, event.event_information), None


def _context_id(assoc: Association, abstract_syntax: UID) -> int | None:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == abstract_syntax:
            return cx.context_id
    return None
