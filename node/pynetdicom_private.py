"""Hooks into pynetdicom's private API that keep hostile peers from holding threads.

pynetdicom 3.0 leaves two ways for a peer to keep a node thread busy without ever
negotiating:

- An exception in the DUL reactor's state machine (an A-ASSOCIATE-RQ with an even
  presentation context ID raises ValueError while it is turned into a primitive; a
  second A-ASSOCIATE-RQ on one connection raises InvalidEventError) escapes the
  reactor thread: nothing answers the peer, and the association thread waits out
  the ACSE timeout. :func:`guard_state_machine` aborts such an association at once.
- A connection closed by its peer before it sends an A-ASSOCIATE-RQ (a port probe,
  a load balancer's TCP check) is noticed by the DUL thread, but the association
  thread still waits for the request for the whole ACSE timeout.
  :func:`release_when_peer_gone` lets it go within :data:`POLL_SECONDS`.

Private API (``dul.state_machine``, ``dul.receive_pdu``, ``AssociationSocket``'s
fields): checked against the pynetdicom version at import.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom.fsm import InvalidEventError

log = logging.getLogger("dicom_node.scp")

SUPPORTED_VERSIONS = ("3.0.",)
if not pynetdicom.__version__.startswith(SUPPORTED_VERSIONS):
    raise ImportError(
        f"dicom-node uses private parts of pynetdicom 3.0; {pynetdicom.__version__} is "
        "installed. Install pynetdicom>=3.0,<3.1 (pyproject.toml pins it)."
    )

POLL_SECONDS = 0.05
A_ABORT = 0x07
SERVICE_PROVIDER = 0x02
UNEXPECTED_PDU = 0x02
INVALID_PDU_PARAMETER = 0x06

# Told about each association aborted this way: (association, exception).
OnReactorError = Callable[[Any, BaseException], None]


def protect_acceptor(assoc: Any, on_error: OnReactorError) -> None:
    """Install both guards on an association the node accepts (at EVT_CONN_OPEN)."""
    closed = threading.Event()
    guard_state_machine(assoc, on_error, closed)
    release_when_peer_gone(assoc, closed)


def guard_state_machine(assoc: Any, on_error: OnReactorError, closed: threading.Event) -> None:
    """Abort ``assoc`` and close its socket when its state machine raises; set
    ``closed`` when the transport connection closes (Evt17) or is closed here."""
    dul = assoc.dul
    original = dul.state_machine.do_action

    def do_action(event: str) -> None:
        if event == "Evt17":  # transport connection closed (PS3.8 9.2)
            closed.set()
        try:
            original(event)
        except Exception as exc:  # any: the thread would die with the socket open
            closed.set()
            on_error(assoc, exc)
            _abort_and_close(assoc, exc)

    dul.state_machine.do_action = do_action


def _abort_and_close(assoc: Any, exc: BaseException) -> None:
    """What pynetdicom does for exceptions it catches in its reactor, plus the close."""
    dul = assoc.dul
    reason = UNEXPECTED_PDU if isinstance(exc, InvalidEventError) else INVALID_PDU_PARAMETER
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.sendall(struct.pack(">BBLxxBB", A_ABORT, 0, 4, SERVICE_PROVIDER, reason))
    assoc.is_aborted = True
    assoc.is_established = False
    assoc._kill = True
    dul._kill_thread = True
    with contextlib.suppress(OSError, AttributeError):
        dul.socket.close()


def release_when_peer_gone(assoc: Any, closed: threading.Event) -> None:
    """Make the association thread's blocking waits end when the connection is gone.

    pynetdicom's acceptor waits ``acse_timeout`` for the A-ASSOCIATE-RQ in one
    blocking ``receive_pdu``; this waits in short slices and gives up as soon as
    the connection has closed or the DUL thread has ended.
    """
    dul = assoc.dul
    original = dul.receive_pdu

    def receive_pdu(wait: bool = False, timeout: float | None = None) -> Any:
        if not wait:
            return original(wait, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            primitive = original(True, min(POLL_SECONDS, left))
            if primitive is not None:
                return primitive
            if closed.is_set() or not dul.is_alive():
                return original(False, None)  # whatever came with the close, else None

    dul.receive_pdu = receive_pdu
