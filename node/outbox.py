"""A destination's durable outbox: ``pending/`` and ``failed/`` below its spool folder.

Layout below ``<spool>/destinations/<name>/``::

    pending/<id>.dcm     waiting for (re)delivery, oldest id first
    pending/<id>.json    its retry state once an attempt failed (absent: never tried)
    failed/<id>.dcm      given up on
    failed/<id>.json     why: status, the peer's error comment, time, attempts

An instance leaves ``pending/`` only when it was delivered (unlink) or moved to
``failed/``; a crash at any moment leaves it in one of the two folders, so it is
delivered at least once. Every state change is written with fsync before it counts.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from node.errors import OutboxError
from node.fsutil import TMP_SUFFIX, fsync_dir, makedirs_durably, write_durably
from node.schema import RetryPolicy
from node.spool import Spool

DCM = ".dcm"
SIDECAR = ".json"


# --------------------------------------------------------------------------- state


@dataclass
class ItemState:
    """Retry state of one pending instance; times are seconds since the epoch."""

    attempts: int = 0
    first_attempt: float | None = None
    next_attempt: float = 0.0
    last_error: str = ""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ItemState:
        return cls(
            attempts=int(raw.get("attempts", 0)),
            first_attempt=raw.get("first_attempt"),
            next_attempt=float(raw.get("next_attempt", 0.0)),
            last_error=str(raw.get("last_error", "")),
        )


@dataclass
class PeerState:
    """A DICOM peer's reachability, shared by all of its instances.

    While the peer cannot be reached, nothing is attempted per instance: the
    destination as a whole backs off, and ``down_since`` is the outage's start
    (kept across restarts so that a restart does not reset give_up_after).
    """

    failures: int = 0
    down_since: float | None = None
    next_attempt: float = 0.0
    last_error: str = ""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PeerState:
        return cls(
            failures=int(raw.get("failures", 0)),
            down_since=raw.get("down_since"),
            next_attempt=float(raw.get("next_attempt", 0.0)),
            last_error=str(raw.get("last_error", "")),
        )


@dataclass(frozen=True)
class Failure:
    """Why an instance is given up on; becomes its ``failed/<id>.json``."""

    error: str
    status: int | None = None  # the peer's C-STORE status, if it answered
    error_comment: str = ""  # the peer's Error Comment (0000,0902), if any
    permanent: bool = True  # False: transient failures outlasted give_up_after


@dataclass(frozen=True)
class PendingItem:
    id: str
    path: Path
    state: ItemState


@dataclass(frozen=True)
class FailedItem:
    id: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.info.get("sop_instance_uid") or sop_instance_uid_of(self.path))


def backoff(policy: RetryPolicy, attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before attempt ``attempts + 1``: exponential, capped, with "equal jitter".

    Half the delay is fixed and half random, so that many instances (or nodes) that
    failed together do not all retry at the same moment.
    """
    delay = min(policy.max, policy.initial * policy.multiplier ** max(attempts - 1, 0))
    return delay / 2 + rng() * delay / 2


def arrival_time(item_id: str) -> float:
    """When the instance was received: ids start with the arrival time in nanoseconds."""
    head = item_id.split("-", 1)[0]
    return int(head) / 1e9 if head.isdigit() else 0.0


def sop_instance_uid_of(path: Path) -> str:
    try:
        return str(read_file_meta_info(path).get("MediaStorageSOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - only for display; an unreadable file shows blank
        return ""


# --------------------------------------------------------------------------- outbox


class Outbox:
    """One destination's pending/ and failed/ folders; safe to use from several threads."""

    def __init__(self, spool: Spool, destination: str) -> None:
        self.destination = destination
        self.pending = spool.pending_dir(destination)
        self.failed = spool.failed_dir(destination)
        self.peer_file = self.pending.parent / "peer.json"

    def create(self) -> None:
        """Create the folders and clear what a crash left half-done."""
        makedirs_durably(self.pending)
        makedirs_durably(self.failed)
        for folder in (self.pending, self.failed):
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
            # A sidecar without its instance: the instance was delivered or moved on
            # between the two unlinks/renames; the sidecar means nothing any more.
            for sidecar in folder.glob(f"*{SIDECAR}"):
                if not sidecar.with_suffix(DCM).exists():
                    sidecar.unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading

    def pending_ids(self) -> list[str]:
        return _ids(self.pending)

    def failed_ids(self) -> list[str]:
        return _ids(self.failed)

    def pending_path(self, item_id: str) -> Path:
        return self.pending / f"{item_id}{DCM}"

    def read_state(self, item_id: str) -> ItemState:
        """The sidecar's state, or a fresh one if the instance was never tried."""
        raw = _read_json(self.pending / f"{item_id}{SIDECAR}")
        return ItemState() if raw is None else ItemState.from_json(raw)

    def list_pending(self) -> list[PendingItem]:
        return [
            PendingItem(i, self.pending_path(i), self.read_state(i)) for i in self.pending_ids()
        ]

    def list_failed(self) -> list[FailedItem]:
        return [
            FailedItem(
                i, self.failed / f"{i}{DCM}", _read_json(self.failed / f"{i}{SIDECAR}") or {}
            )
            for i in self.failed_ids()
        ]

    def read_peer(self) -> PeerState:
        raw = _read_json(self.peer_file)
        return PeerState() if raw is None else PeerState.from_json(raw)

    # ---------------------------------------------------------------- changing

    def save_peer(self, peer: PeerState) -> None:
        if peer.failures == 0:
            self.peer_file.unlink(missing_ok=True)
        else:
            write_durably(self.peer_file, [_dump(asdict(peer))], sync_dir=False)

    def save_state(self, item_id: str, state: ItemState) -> None:
        write_durably(self.pending / f"{item_id}{SIDECAR}", [_dump(asdict(state))])

    def delivered(self, item_id: str) -> None:
        """The peer has the instance: forget it (instance first, so a crash re-sends)."""
        self.pending_path(item_id).unlink(missing_ok=True)
        (self.pending / f"{item_id}{SIDECAR}").unlink(missing_ok=True)
        # No directory fsync: if the unlink is lost in a power cut, the instance is
        # sent once more, which at-least-once delivery allows.

    def fail(
        self,
        item_id: str,
        failure: Failure,
        state: ItemState,
        sop_instance_uid: str = "",
        now: float | None = None,
    ) -> Path:
        """Move the instance to ``failed/`` with a sidecar saying why."""
        now = time.time() if now is None else now
        info = {
            "reason": "permanent failure" if failure.permanent else "gave up retrying",
            "error": failure.error,
            "status": None if failure.status is None else f"0x{failure.status:04X}",
            "error_comment": failure.error_comment,
            "time": now,
            "time_text": _iso(now),
            "attempts": state.attempts,
            "first_attempt": state.first_attempt,
            "sop_instance_uid": sop_instance_uid,
        }
        # The reason first: a crash before the rename leaves the instance pending
        # (it is tried again) and an orphan sidecar that create() removes.
        write_durably(self.failed / f"{item_id}{SIDECAR}", [_dump(info)])
        target = self.failed / f"{item_id}{DCM}"
        os.replace(self.pending_path(item_id), target)
        fsync_dir(self.failed)
        fsync_dir(self.pending)
        (self.pending / f"{item_id}{SIDECAR}").unlink(missing_ok=True)
        return target

    def retry(self, item_ids: Iterable[str]) -> list[str]:
        """Move failed instances back to ``pending/`` with a fresh retry state."""
        moved = []
        makedirs_durably(self.pending)
        for item_id in item_ids:
            source = self.failed / f"{item_id}{DCM}"
            if not source.exists():
                raise OutboxError(f"{self.destination}: no failed instance with id {item_id}")
            (self.pending / f"{item_id}{SIDECAR}").unlink(missing_ok=True)
            os.replace(source, self.pending_path(item_id))
            fsync_dir(self.pending)
            fsync_dir(self.failed)
            (self.failed / f"{item_id}{SIDECAR}").unlink(missing_ok=True)
            moved.append(item_id)
        return moved

    def failed_ids_for(self, sop_instance_uids: Iterable[str]) -> list[str]:
        """The failed/ ids holding these SOP Instance UIDs; raise if one is not there."""
        wanted = set(sop_instance_uids)
        found: dict[str, list[str]] = {}
        for item in self.list_failed():
            uid = item.sop_instance_uid
            if uid in wanted:
                found.setdefault(uid, []).append(item.id)
        missing = sorted(wanted - found.keys())
        if missing:
            raise OutboxError(
                f"{self.destination}: no failed instance with SOP Instance UID {', '.join(missing)}"
            )
        return sorted(i for ids in found.values() for i in ids)


# --------------------------------------------------------------------------- scheduling


class Scheduler:
    """Which pending instances are due, shared by a destination's sender threads.

    Retry states are cached in memory (this process is the only writer of the
    pending sidecars) and an instance is handed to one sender at a time.
    """

    def __init__(self, outbox: Outbox, policy: RetryPolicy, clock: Callable[[], float] = time.time):
        self.outbox = outbox
        self.policy = policy
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, ItemState] = {}
        self._claimed: set[str] = set()
        # Stored at the peer, awaiting its Storage Commitment: not to be sent again.
        self._held: set[str] = set()

    def claim(
        self, limit: int, accept: Callable[[str], bool] | None = None
    ) -> tuple[list[str], float]:
        """Up to ``limit`` due, unclaimed ids (oldest first) and seconds until the next is due.

        ``accept`` may refuse an id (e.g. a SOP class the association cannot carry);
        refused ids stay unclaimed for another sender.
        """
        now = self.clock()
        chosen: list[str] = []
        next_due = float("inf")
        with self._lock:
            ids = self.outbox.pending_ids()
            live = set(ids)
            for gone in [i for i in self._states if i not in live]:
                del self._states[gone]
            for item_id in ids:
                if len(chosen) >= limit:
                    break
                if item_id in self._claimed or item_id in self._held:
                    continue
                state = self._state(item_id)
                if state.next_attempt > now:
                    next_due = min(next_due, state.next_attempt - now)
                    continue
                if accept is not None and not accept(item_id):
                    continue
                chosen.append(item_id)
            self._claimed.update(chosen)
        return chosen, next_due

    def due_count(self) -> int:
        now = self.clock()
        with self._lock:
            return sum(
                1
                for i in self.outbox.pending_ids()
                if i not in self._claimed
                and i not in self._held
                and self._state(i).next_attempt <= now
            )

    def release(self, item_ids: Iterable[str]) -> None:
        with self._lock:
            self._claimed.difference_update(item_ids)

    def hold(self, item_ids: Iterable[str]) -> None:
        """Keep instances out of :meth:`claim` until :meth:`unhold` (awaiting commitment)."""
        with self._lock:
            self._held.update(item_ids)

    def unhold(self, item_ids: Iterable[str]) -> None:
        with self._lock:
            self._held.difference_update(item_ids)

    def state(self, item_id: str) -> ItemState:
        with self._lock:
            return self._state(item_id)

    def delivered(self, item_id: str) -> None:
        self.outbox.delivered(item_id)
        with self._lock:
            self._states.pop(item_id, None)
            self._held.discard(item_id)

    def fail(self, item_id: str, failure: Failure, sop_instance_uid: str = "") -> None:
        state = self.state(item_id)
        self.outbox.fail(item_id, failure, state, sop_instance_uid, self.clock())
        with self._lock:
            self._states.pop(item_id, None)

    def transient(self, item_id: str, error: str) -> bool:
        """Record a failed attempt and schedule the next; False if it is time to give up."""
        now = self.clock()
        state = self.state(item_id)
        started = now if state.first_attempt is None else state.first_attempt
        state = ItemState(
            attempts=state.attempts + 1,
            first_attempt=started,
            next_attempt=now + backoff(self.policy, state.attempts + 1),
            last_error=error,
        )
        if now - started >= self.policy.give_up_after:
            with self._lock:
                self._states[item_id] = state
            return False
        self.outbox.save_state(item_id, state)
        with self._lock:
            self._states[item_id] = state
        return True

    def _state(self, item_id: str) -> ItemState:
        state = self._states.get(item_id)
        if state is None:
            state = self._states[item_id] = self.outbox.read_state(item_id)
        return state


class Waker:
    """Wakes sleeping sender threads when something new is pending, without lost wake-ups."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def mark(self) -> int:
        """Call before looking for work; pass the result to :meth:`wait`."""
        with self._cond:
            return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep up to ``timeout`` unless :meth:`notify` was called since :meth:`mark`."""
        with self._cond:
            if self._generation == seen:
                self._cond.wait(max(timeout, 0.0))


# --------------------------------------------------------------------------- helpers


def _ids(folder: Path) -> list[str]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(n[: -len(DCM)] for n in names if n.endswith(DCM) and not n.startswith("."))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # A damaged sidecar must not stop delivery: treat the instance as fresh.
        return None
    return raw if isinstance(raw, dict) else None


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))
