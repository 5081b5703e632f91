"""Receiving processes: ``node.receivers: N`` processes accept on the same port.

One process answers every association by default; on a machine with many cores its
one core is the limit on intake (about 2.4 ms of CPU per CT image, issue 16). With
``receivers: N`` the main process stops listening and starts N receiving processes
that each bind the node's ports with SO_REUSEPORT (the kernel spreads new
connections over them) and run the same negotiation and data phase
(node/scp.py, node/dataphase.py). What stays in the main process: the spool lock,
the dispatcher and workers, the sending process, the metrics. A receiving process
tells the main process over a socket pair:

- ``("submit", path)``: an instance it acknowledged (durable in ``incoming/``): the
  dispatcher takes it at once, without polling the spool;
- ``("stored", size, ok, seconds)``, ``("protocol_error", kind)``: the metrics,
  summed over receivers in the main process's registry;
- ``("opened",)``, ``("closed",)``: associations in progress, counted across the
  receivers, and ``("count", id)`` asked when an association is requested, so that
  ``node.max_associations`` holds for the node as a whole;
- ``("report", id, event_type, info)``: a Storage Commitment report, answered with
  the status the destination gives it.

The main process sends ``("config", config)`` on reload and ``("stop",)`` at
shutdown (the receiver stops accepting, lets associations in progress finish for up to
30 s, then exits). A receiving process that dies is started again; what it
acknowledged is in the spool and reaches the workers as the spool is re-read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from node.config import Config
from node.errors import StartupError
from node.scp import (
    Door,
    Gatekeeper,
    NoDelayAssociationServer,
    build_ae,
    enable_any_storage_class,
    handlers,
    server_tls_context,
)
from node.senders import die_with_parent, setup_logging
from node.spool import Spool

log = logging.getLogger("dicom_node.receivers")

START_SECONDS = 60.0
RPC_SECONDS = 10.0
DRAIN_SECONDS = 30.0
RESTART_DELAY = 1.0

Submit = Callable[[Path], None]
CommitmentReport = Callable[[int, Dataset | None], int]


# ---------------------------------------------------------------------- the main process


class ReceiverPool:
    """The receiving processes, seen from the main process."""

    def __init__(
        self,
        config: Config,
        submit: Submit,
        commitment_report: CommitmentReport,
        metrics: Any,
        count: int,
        rescan: Callable[[], int] = lambda: 0,
    ) -> None:
        self.config = config
        self.submit = submit
        self.rescan = rescan
        self.commitment_report = commitment_report
        self.metrics = metrics
        self.count = count
        self._established = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._children: list[_Child] = []

    def start(self) -> None:
        for index in range(self.count):
            child = _Child(self, index)
            child.start()
            self._children.append(child)

    def established(self) -> int:
        with self._lock:
            return self._established

    def draining(self, draining: bool) -> None:
        for child in self._children:
            child.send(("draining", draining))

    def reload(self, config: Config) -> None:
        self.config = config
        for child in self._children:
            child.send(("config", config))

    def stop(self) -> None:
        """Each receiver stops accepting, lets its associations finish, and exits."""
        with self._lock:
            self._stopping = True
        for child in self._children:
            child.send(("stop",))
        for child in self._children:
            child.wait(DRAIN_SECONDS + 15.0)

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def handle(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "submit":
            self.submit(Path(message[1]))
        elif kind == "stored":
            self.metrics.received(*message[1:])
        elif kind == "protocol_error":
            self.metrics.protocol_error(message[1])
        elif kind in ("opened", "closed"):
            with self._lock:
                self._established += 1 if kind == "opened" else -1
        elif kind == "count":
            child.send(("reply", message[1], self.established()))
        elif kind == "report":
            _, request, event_type, info = message
            try:
                status = self.commitment_report(event_type, info)
            except Exception:  # a bug must not take the receiver's link down
                log.exception("cannot process a storage commitment report")
                status = 0x0110
            child.send(("reply", request, status))

    def pids(self) -> list[int]:
        return [pid for child in self._children if (pid := child.pid) is not None]


class _Child:
    """One receiving process; restarted by its keeper thread if it dies."""

    def __init__(self, pool: ReceiverPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._send_lock = threading.Lock()
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._keeper = threading.Thread(target=self._keep, name=f"receiver-{index}", daemon=True)
        self._opened = 0  # associations it reported open: closed for it if it dies

    def start(self) -> None:
        # The keeper thread starts the process: the kernel's parent-death signal follows
        # the thread that started it, and this one lives as long as the node.
        self._keeper.start()
        self._started.wait(START_SECONDS + 5.0)
        if self._failure is not None or self._process is None:
            raise StartupError(f"receiving process {self.index}: {self._failure or 'no start'}")

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [
            sys.executable,
            "-m",
            "node.receivers",
            str(theirs.fileno()),
            str(os.getpid()),
            str(self.index),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with theirs:
            process = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env)
        conn = Connection(ours.detach())
        conn.send_bytes(pickle.dumps(self.pool.config))
        try:
            if not conn.poll(START_SECONDS):
                raise StartupError(f"did not start within {START_SECONDS:.0f}s")
            first = pickle.loads(conn.recv_bytes())
            if first[0] != "ready":
                raise StartupError(str(first[1]) if len(first) > 1 else "did not start")
        except (EOFError, OSError, StartupError) as exc:
            process.kill()
            process.wait()
            raise StartupError(str(exc) or "died while starting") from exc
        self._conn, self._process = conn, process

    def _keep(self) -> None:
        first = True
        while True:
            try:
                self._spawn()
            except StartupError as exc:
                if first:
                    self._failure = exc
                    self._started.set()
                    return
                log.error("receiving process %d: %s; trying again", self.index, exc)
                time.sleep(RESTART_DELAY)
                continue
            if first:
                self._started.set()
                first = False
            self._read()
            assert self._process is not None
            self._process.wait()
            self._forget_open_associations()
            if self.pool.stopping:
                return
            # Everything it said has been read: what it acknowledged and did not say
            # is in incoming/ (a rename is durable before the answer).
            found = self.pool.rescan()
            if found:
                log.info("queued %d instance(s) a receiving process had not reported", found)
            log.error(
                "receiving process %d exited (status %s); starting it again, what it "
                "acknowledged is in the spool",
                self.index,
                self._process.returncode,
            )
            time.sleep(RESTART_DELAY)

    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            if message[0] == "opened":
                self._opened += 1
            elif message[0] == "closed":
                self._opened -= 1
            self.pool.handle(self, message)

    def _forget_open_associations(self) -> None:
        with self.pool._lock:
            self.pool._established -= self._opened
        self._opened = 0

    def send(self, message: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            conn.send_bytes(pickle.dumps(message))

    def wait(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._keeper.join(5.0)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


# ---------------------------------------------------------------------- a receiving process


class ParentLink:
    """A receiving process's side of the socket pair: messages and answered requests."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._replies: dict[int, Any] = {}
        self._replied = threading.Condition()
        self._next = 0
        self.inbox: list[tuple[Any, ...]] = []
        self.control = threading.Condition()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send_bytes(pickle.dumps(message))

    def ask(self, kind: str, *args: Any) -> Any:
        with self._replied:
            self._next += 1
            request = self._next
        self.send((kind, request, *args))
        deadline = time.monotonic() + RPC_SECONDS
        with self._replied:
            while request not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._replied.wait(left)
            return self._replies.pop(request)

    def read_forever(self) -> None:
        """Replies go to their askers; control messages to :attr:`inbox`."""
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                message = ("stop",)  # the node is gone
            if message[0] == "reply":
                with self._replied:
                    self._replies[message[1]] = message[2]
                    self._replied.notify_all()
                continue
            with self.control:
                self.inbox.append(message)
                self.control.notify_all()
            if message[0] == "stop":
                return

    # The receiving side's hooks (node/scp.py).

    def submit(self, path: Path) -> None:
        self.send(("submit", str(path)))

    def received(self, size: int, ok: bool, seconds: float) -> None:
        self.send(("stored", size, ok, seconds))

    def protocol_error(self, kind: str) -> None:
        self.send(("protocol_error", kind))

    def established(self, event: Event) -> int:
        count = self.ask("count")
        return 0 if count is None else int(count)

    def commitment_report(self, event_type: int, info: Dataset | None) -> int:
        status = self.ask("report", event_type, info)
        return 0x0110 if status is None else int(status)


def main() -> None:
    """Entry point: ``python -m node.receivers <socket fd> <node pid> <index>``."""
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    conn = Connection(fd)
    config: Config = pickle.loads(conn.recv_bytes())
    die_with_parent(parent_pid, niceness=0)
    setup_logging(config)
    _tag_log_lines(int(sys.argv[3]))
    link = ParentLink(conn)
    settings = config.node
    try:
        enable_any_storage_class()
        ae = build_ae(settings)
        gatekeeper = Gatekeeper(settings, established=link.established)
        draining = threading.Event()
        door = Door(
            proxy_protocol=lambda: gatekeeper.settings.proxy_protocol,
            draining=draining.is_set,
            handshake_timeout=lambda: gatekeeper.settings.acse_timeout,
        )
        watchers = [
            (evt.EVT_ACCEPTED, lambda event: link.send(("opened",))),
            (evt.EVT_RELEASED, lambda event: link.send(("closed",))),
            (evt.EVT_ABORTED, lambda event: link.send(("closed",))),
        ]
        evt_handlers = handlers(
            Spool(settings.spool, settings.min_free_space),
            link.submit,
            gatekeeper,
            link,
            commitment_report=link.commitment_report,
            watchers=watchers,
        )
        servers = []
        listeners: list[tuple[int, Any]] = []
        if settings.port is not None:
            listeners.append((settings.port, None))
        if settings.tls is not None:
            listeners.append((settings.tls.port, server_tls_context(settings.tls)))
        for port, tls in listeners:
            server = ae.make_server(
                (settings.host, port),
                evt_handlers=evt_handlers,
                ssl_context=tls,
                server_class=ReusePortServer,
            )
            assert isinstance(server, ReusePortServer)
            server.door = door  # PROXY protocol, TLS handshake, draining: as in one process
            servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
    except Exception as exc:  # noqa: BLE001 - said to the main process, which says it
        link.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    threading.Thread(target=link.read_forever, daemon=True).start()
    link.send(("ready",))
    _serve(link, gatekeeper, servers, draining)


def _tag_log_lines(index: int) -> None:
    """Text log lines say which receiving process wrote them."""
    for handler in logging.getLogger().handlers:
        if type(handler.formatter) is logging.Formatter:
            handler.setFormatter(
                logging.Formatter(
                    f"%(asctime)s %(levelname)s %(name)s[receiver {index}]: %(message)s"
                )
            )


def _serve(
    link: ParentLink, gatekeeper: Any, servers: list[Any], draining: threading.Event
) -> None:
    while True:
        with link.control:
            while not link.inbox:
                link.control.wait()
            message = link.inbox.pop(0)
        if message[0] == "config":
            gatekeeper.settings = message[1].node  # the next association sees it
        elif message[0] == "draining":
            (draining.set if message[1] else draining.clear)()
        elif message[0] == "stop":
            _drain(servers)
            return


def _drain(servers: list[Any]) -> None:
    for server in servers:
        server.shutdown()
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline and any(
        a.is_established for s in servers for a in s.active_associations
    ):
        time.sleep(0.05)
    for server in servers:
        for assoc in server.active_associations:
            assoc.abort()


class ReusePortServer(NoDelayAssociationServer):
    """Several processes bind the same port; the kernel spreads connections over them."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


if __name__ == "__main__":
    main()
