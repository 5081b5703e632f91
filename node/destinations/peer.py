"""Whether a destination's peer is worth trying now: its health and backoff.

A peer that refuses connections or drops associations is not tried again until its
backoff has passed (the destination's ``retry`` policy, counted in failed attempts),
so that a dead PACS costs one connection attempt per backoff step, not one per
instance. The state is saved in the outbox (``peer.json``), so that a restart keeps
the backoff and ``dicom-node queue`` can show the outage.
"""

from __future__ import annotations

import logging
import threading
import time

from node.outbox import Outbox, PeerState, backoff
from node.schema import RetryPolicy

log = logging.getLogger("dicom_node.dicom")


class PeerHealth:
    """One destination's view of its peer; safe to use from every sender thread."""

    def __init__(self, name: str, outbox: Outbox, policy: RetryPolicy) -> None:
        self.name = name
        self.outbox = outbox
        self.policy = policy
        self._lock = threading.Lock()
        self._state = PeerState()

    def load(self) -> None:
        """Take up the state an earlier run saved."""
        with self._lock:
            self._state = self.outbox.read_peer()

    def wait(self) -> float:
        """Seconds until the peer may be tried again (<= 0: now)."""
        with self._lock:
            return self._state.next_attempt - time.time()

    def outage(self) -> tuple[float | None, str]:
        """Since when the peer has been failing (None: it is not), and the last error."""
        with self._lock:
            return self._state.down_since, self._state.last_error

    def ok(self) -> None:
        """An association was established: the outage, if any, is over."""
        with self._lock:
            if self._state.failures == 0:
                return
            log.info(
                "%s: peer reachable again after %d failed attempt(s)",
                self.name,
                self._state.failures,
            )
            self._state = PeerState()
            self.outbox.save_peer(self._state)

    def failed(self, error: str) -> None:
        """An attempt failed: back off (exponentially, with jitter) before the next."""
        now = time.time()
        with self._lock:
            state = self._state
            failures = state.failures + 1
            self._state = PeerState(
                failures=failures,
                down_since=state.down_since if state.down_since is not None else now,
                next_attempt=now + backoff(self.policy, failures),
                last_error=error,
            )
            self.outbox.save_peer(self._state)
            wait = self._state.next_attempt - now
        log.warning("%s: %s; next attempt in %.1f s", self.name, error, wait)
