"""Retries a folder destination's outbox: what a worker could not write at once.

Workers write to folders directly; only a failed write (disk full, a share that
is away) leaves the instance in ``pending/``. One thread retries those with the
destination's backoff (folders have no retry settings; the defaults apply).
"""

from __future__ import annotations

import logging
import threading

import pydicom
from pydicom.errors import InvalidDicomError

from node.destinations import Runner, folder
from node.destinations.folder import FolderDestination
from node.fsutil import is_permanent
from node.outbox import Failure, Outbox, Scheduler, Waker
from node.schema import RetryPolicy
from node.spool import Spool

log = logging.getLogger("dicom_node.folder")

POLL_SECONDS = 2.0
BATCH = 100


class FolderRetryRunner(Runner):
    """Delivers a folder destination's pending instances with backoff."""

    def __init__(self, dest: FolderDestination, spool: Spool, policy: RetryPolicy | None = None):
        self.dest = dest
        self.outbox = Outbox(spool, dest.name)
        self.scheduler = Scheduler(self.outbox, policy or RetryPolicy())
        self.waker = Waker()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"retry-{dest.name}", daemon=True)

    def start(self) -> None:
        self.outbox.create()
        self._thread.start()

    def notify(self) -> None:
        self.waker.notify()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.waker.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            seen = self.waker.mark()
            ids, next_due = self.scheduler.claim(BATCH)
            try:
                for item_id in ids:
                    if self._stopping.is_set():
                        break
                    self._deliver(item_id)
            except Exception:  # noqa: BLE001 - a bug must not silently stop the destination
                log.exception("%s: unexpected error while retrying", self.dest.name)
                self._stopping.wait(1.0)
            finally:
                self.scheduler.release(ids)
            if not ids:
                self.waker.wait(seen, min(next_due, POLL_SECONDS))

    def _deliver(self, item_id: str) -> None:
        path = self.outbox.pending_path(item_id)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            target = folder.deliver(self.dest, ds, path)
        except (InvalidDicomError, AttributeError, folder.UnsafePathError) as exc:
            log.error("%s: %s moved to failed/: %s", self.dest.name, item_id, exc)
            self.scheduler.fail(item_id, Failure(error=str(exc)))
            return
        except OSError as exc:
            if is_permanent(exc):  # retrying the same name cannot succeed
                log.error("%s: %s moved to failed/: %s", self.dest.name, item_id, exc)
                self.scheduler.fail(item_id, Failure(error=f"cannot write: {exc}"))
            elif self.scheduler.transient(item_id, f"cannot write: {exc}"):
                log.warning("%s: %s not written, will retry: %s", self.dest.name, item_id, exc)
            else:
                self.scheduler.fail(item_id, Failure(error=str(exc), permanent=False))
            return
        self.scheduler.delivered(item_id)
        log.info("%s: delivered %s on retry", self.dest.name, target)
