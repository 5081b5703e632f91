"""Every use of pynetdicom's private API, in one module, behind a version check.

pynetdicom is pinned below 3.1 because the node reaches into it here, and only here:

- :class:`Handover`: the DUL thread lets go of an established association's socket,
  so that node/dataphase.py serves its data phase (pynetdicom's costs five times
  DCMTK's CPU per instance and holds each data set in memory).
- :func:`shorter_dul_poll`: the DUL thread's polling delay (``_run_loop_delay``).
- :func:`enable_unrestricted_storage`: every storage SOP class is accepted, through
  pynetdicom's unrestricted negotiation with a filter of the node's own.
- :func:`keep_responses_from_the_reactor`: a race in pynetdicom's reactor that loses
  C-STORE responses on the node's own (requestor) associations.
- :func:`send_files_as_they_are`: pynetdicom streams a C-STORE from its file.
- :func:`protect_acceptor`: hostile peers cannot hold threads (below).

pynetdicom 3.0 leaves two ways for a peer to keep a node thread busy without ever
negotiating:

- An exception in the DUL reactor's state machine (an A-ASSOCIATE-RQ with an even
  presentation context ID raises ValueError while it is turned into a primitive; a
  second A-ASSOCIATE-RQ on one connection raises InvalidEventError) escapes the
  reactor thread: nothing answers the peer, and the association thread waits out
  the ACSE timeout. :func:`guard_state_machine` aborts such an association at once.
- An exception while the association thread negotiates (found by the mutation
  campaign: a presentation context without an abstract syntax) ends that thread the
  same way; :func:`guard_negotiation` aborts instead.
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
import pynetdicom._config
import pynetdicom.acse
import pynetdicom.presentation
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
    guard_negotiation(assoc, on_error, closed)
    release_when_peer_gone(assoc, closed)


def guard_negotiation(assoc: Any, on_error: OnReactorError, closed: threading.Event) -> None:
    """Abort ``assoc`` and close its socket when negotiating its A-ASSOCIATE-RQ raises.

    The association thread negotiates; an exception there (a presentation context
    without an abstract syntax made pydicom's UID raise TypeError, found by the
    campaign) ended the thread and left the connection and the DUL thread behind.
    """
    acse = assoc.acse
    original = acse.negotiate_association

    def negotiate_association() -> None:
        try:
            original()
        except Exception as exc:  # any: the thread would die with the socket open
            closed.set()
            on_error(assoc, exc)
            _abort_and_close(assoc, exc)

    acse.negotiate_association = negotiate_association


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


# ---------------------------------------------------------------------- the data phase


class Handover:
    """Moves an established association's socket from pynetdicom's DUL thread to ours.

    pynetdicom's DUL thread sends the A-ASSOCIATE-AC and would then read the first
    P-DATA. It is held at that point (state Sta6) until the association thread decides:
    take the socket over (the DUL thread then ends without reading), or leave it to
    pynetdicom.
    """

    def __init__(self, assoc: Any, wait_seconds: float) -> None:
        self._assoc = assoc
        self._decided = threading.Event()
        self._taken = False
        self._wait = wait_seconds
        dul = assoc.dul
        self._original = dul._is_transport_event
        # The DUL reactor calls this once per loop to read the next PDU.
        dul._is_transport_event = self._transport_event

    def _transport_event(self) -> bool:
        dul = self._assoc.dul
        if dul.state_machine.current_state != "Sta6":
            return bool(self._original())
        self._decided.wait(self._wait)
        if self._taken:
            dul._kill_thread = True  # leave the loop without touching the socket
            return False
        dul._is_transport_event = self._original
        return bool(self._original())

    def decide(self, take: bool) -> bool:
        """Record the decision; if taking, wait until the DUL thread has let go."""
        self._taken = take
        self._decided.set()
        if take:
            self._assoc.dul.join(self._wait)
            if self._assoc.dul.is_alive():
                log.error("pynetdicom's DUL thread did not stop; aborting the association")
                return False
        return True


def socket_of(assoc: Any) -> Any:
    """The connected socket of a pynetdicom association (None once closed)."""
    transport = assoc.dul.socket
    return None if transport is None else transport.socket


def shorter_dul_poll(assoc: Any, seconds: float) -> None:
    """The DUL thread polls its socket every ``seconds`` instead of 1 ms (see the
    caller for why)."""
    assoc.dul._run_loop_delay = seconds


# ---------------------------------------------------------------------- negotiation

# (requested contexts, supported contexts, roles) -> (result contexts, reply roles)
Negotiate = Callable[[list[Any], list[Any], Any], Any]


def enable_unrestricted_storage(
    narrow: Callable[[Negotiate, list[Any], list[Any], Any], Any],
) -> None:
    """Accept every storage-like abstract syntax, negotiated through ``narrow``.

    ``narrow(original, rq_contexts, ac_contexts, roles)`` calls pynetdicom's
    unrestricted negotiation (``original``) on what it keeps and may change its result.
    Installed once per process.
    """
    pynetdicom._config.UNRESTRICTED_STORAGE_SERVICE = True
    # pynetdicom.acse imported the function by name: replace it there.
    if getattr(getattr(pynetdicom.acse, "negotiate_unrestricted"), "_dicom_node", False):  # noqa: B009
        return
    original = pynetdicom.presentation.negotiate_unrestricted

    def negotiate(rq_contexts: list[Any], ac_contexts: list[Any], roles: Any = None) -> Any:
        return narrow(original, rq_contexts, ac_contexts, roles)

    negotiate._dicom_node = True  # type: ignore[attr-defined]
    setattr(pynetdicom.acse, "negotiate_unrestricted", negotiate)  # noqa: B010


def is_storage_like(uid: Any) -> bool:
    """The test pynetdicom's unrestricted negotiation applies to an abstract syntax."""
    from pynetdicom import sop_class
    from pynetdicom.sop_class import _STORAGE_CLASSES

    return bool(
        uid.is_private or uid in _STORAGE_CLASSES.values() or not hasattr(sop_class, uid.keyword)
    )


# ---------------------------------------------------------------------- the node as SCU


def send_files_as_they_are() -> None:
    """C-STOREs of a file path stream the file in PDU-sized chunks, undecoded.

    A process-wide switch; the node sends no other C-STORE by path, and data sets
    passed as objects are still encoded.
    """
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True


def keep_responses_from_the_reactor(assoc: Any) -> None:
    """Guard a requestor's association against a pynetdicom race that loses a response.

    pynetdicom 3.0's reactor thread takes requests from the peer off the DIMSE queue;
    ``send_c_store`` and the other ``send_*`` pause it (clear a checkpoint, wait until
    it says paused) and then wait on the same queue for their response. A reactor that
    has just passed the checkpoint when the pause starts can still take the response:
    it logs "Received unexpected C-STORE service message" and drops it, and the sender
    waits out the DIMSE timeout, then aborts the association (seen in the benchmarks:
    docs/decisions.md#d14). Here a response the reactor takes while a
    request is waiting for it (checkpoint cleared) goes back on the queue.
    """
    serve_request = assoc._serve_request

    def serve_or_put_back(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(msg, context_id)

    assoc._serve_request = serve_or_put_back


def take_over_socket(assoc: Any, wait_seconds: float) -> Any:
    """Stop pynetdicom's threads of an established requestor association and return
    its socket, now the caller's alone; None if pynetdicom would not let go.

    The association thread is paused at its checkpoint (where ``send_*`` pause it)
    and the DUL thread leaves its loop without touching the socket; the caller then
    writes requests, reads responses and releases (node/destinations/dicom_wire.py),
    and calls :func:`end_taken_over` at the end.
    """
    sock = socket_of(assoc)
    if sock is None:
        return None
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + wait_seconds
    while not assoc._is_paused:
        if not assoc.is_established or time.monotonic() > deadline:
            assoc._reactor_checkpoint.set()
            return None
        time.sleep(0.0001)
    assoc.dul.kill_dul()
    assoc.dul.join(wait_seconds)
    if assoc.dul.is_alive():
        log.error("pynetdicom's DUL thread did not stop; sending through pynetdicom")
        return None
    return sock


def end_taken_over(assoc: Any, released: bool) -> None:
    """After the caller released or aborted a taken-over association: pynetdicom's
    bookkeeping, and its association thread ends."""
    assoc.is_released, assoc.is_aborted = released, not released
    assoc.kill()
