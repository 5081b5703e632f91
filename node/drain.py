"""Draining: leaving a load balancer's pool before refusing anyone.

From SIGTERM (or ``dicom-node drain``, which sends SIGUSR1) ``/healthz`` answers
503 ``draining`` and the balancer's DICOM-level checks are closed, while the node
still accepts and serves associations. On SIGTERM the listeners close only once the
drain window (``node.drain_seconds``) has passed since draining began, so the
balancer has seen the failing check and sends new associations elsewhere before
any connection would be refused. ``dicom-node drain --cancel`` (SIGUSR2) ends a
drain that was not followed by a stop.

The running node is found through its spool: ``dicom-node run`` holds an exclusive
``flock`` on ``<spool>/.lock``, which holds its process id (node.spool.SpoolLock; the
lock also keeps a second node from working on the same spool).
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

from node.spool import LOCK_NAME

DRAIN_SIGNAL = signal.SIGUSR1
UNDRAIN_SIGNAL = signal.SIGUSR2


class DrainState:
    """Whether the node is draining, and since when (monotonic seconds).

    Changed only by the main thread (the signal handlers run there too), read by
    any: no lock, which a signal handler could wait on forever.
    """

    def __init__(self) -> None:
        self._since: float | None = None

    def start(self) -> bool:
        """Begin draining; False if it already was (the window keeps its start)."""
        if self._since is not None:
            return False
        self._since = time.monotonic()
        return True

    def cancel(self) -> bool:
        was, self._since = self._since is not None, None
        return was

    def is_draining(self) -> bool:
        return self._since is not None

    def remaining(self, window: float) -> float:
        """Seconds left of a drain window of ``window`` seconds (0 if not draining)."""
        since = self._since
        return 0.0 if since is None else max(0.0, since + window - time.monotonic())


def running_node(spool: Path) -> int | None:
    """The pid of the node that holds ``spool``'s lock (node.spool.SpoolLock), or None
    if none runs."""
    path = spool / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path)
    else:
        return None  # nobody holds it: the file is left from a stopped node
    finally:
        os.close(fd)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
