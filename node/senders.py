"""The sending process: the destinations' runners, out of the receiving process.

The node's main process answers modalities (node/scp.py, node/dataphase.py) and feeds
the workers; the runners that work the outboxes (C-STORE, STOW-RS, folder retries)
run in one process of their own, so that sending never shares a CPU time slice or the
GIL with the thread that answers C-STOREs (issue 15: while it sent, the node
acknowledged 30-40 % more slowly). The main process keeps a proxy per destination
(:class:`RemoteRunner`) with the :class:`~node.destinations.Runner` interface:
``notify`` (something new is pending), ``commitment_report`` (a Storage Commitment
report that reached the node's SCP) and ``stop``.

Everything a runner works on is on disk (outbox, retry state, commitment
transactions), so a sending process that dies is simply started again: an instance
it was sending stays in ``pending/`` and is sent again (at-least-once).

Messages (pickled, over a socket pair): to the process ``("notify", name)``,
``("report", id, name, transaction_uid, event_type, info)``, ``("stop", name,
timeout)``, ``("exit",)``; from it ``("ready",)``, ``("status", id, status)``,
``("stopped", name)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from node.config import Config
from node.destinations import Runner, type_of
from node.errors import StartupError
from node.spool import Spool

log = logging.getLogger("dicom_node.senders")

START_SECONDS = 60.0
REPORT_SECONDS = 10.0
RESTART_DELAY = 1.0
# Below the receiving process, above the workers (SCHED_IDLE): answering modalities
# comes first, and forwarding should not wait for a compression backlog.
SENDER_NICENESS = 5
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


# ---------------------------------------------------------------------- the main process


class SenderProcess:
    """The sending process, seen from the main process; restarted if it dies."""

    def __init__(self, config: Config, names: list[str]) -> None:
        self.config = config
        self.names = names
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._send_lock = threading.Lock()
        self._replies: dict[int, Any] = {}
        self._replied = threading.Condition()
        self._next_id = 0
        self._running = set(self.names)
        self._exiting = False
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        # One thread reads replies and restarts the process for the node's lifetime:
        # the kernel's parent-death signal follows the thread that started a process.
        self._reader = threading.Thread(target=self._keep, name="sender-keeper", daemon=True)
        self._reader.start()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, "-m", "node.senders", str(theirs.fileno()), str(os.getpid())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with theirs:
            process = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env)
        conn = Connection(ours.detach())
        conn.send_bytes(pickle.dumps((self.config, sorted(self._running))))
        try:
            if not conn.poll(START_SECONDS) or pickle.loads(conn.recv_bytes()) != ("ready",):
                raise StartupError(f"the sending process did not start within {START_SECONDS}s")
        except (EOFError, OSError) as exc:
            process.kill()
            process.wait()
            raise StartupError(f"the sending process died while starting: {exc}") from exc
        self._conn, self._process = conn, process

    def _keep(self) -> None:
        """Replies from the process; a new process whenever it dies while it should run."""
        while True:
            conn, process = self._conn, self._process
            assert conn is not None and process is not None
            self._read(conn)
            process.wait()
            with self._replied:
                self._replied.notify_all()
                if self._exiting or not self._running:
                    return
            log.error(
                "the sending process exited (%s); starting it again, nothing pending is lost",
                _exit_text(process.returncode),
            )
            while True:
                time.sleep(RESTART_DELAY)
                try:
                    self._spawn()
                    break
                except StartupError as exc:
                    log.error("%s; trying again", exc)

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            with self._replied:
                if message[0] == "status":
                    self._replies[message[1]] = message[2]
                elif message[0] == "stopped":
                    self._running.discard(message[1])
                self._replied.notify_all()

    def _send(self, message: tuple[Any, ...]) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            with self._send_lock:
                conn.send_bytes(pickle.dumps(message))
        except (OSError, ValueError):
            return False
        return True

    def notify(self, name: str) -> None:
        self._send(("notify", name))

    def commitment_report(self, name: str, uid: str, event_type: int, info: Any) -> int | None:
        with self._replied:
            self._next_id += 1
            request = self._next_id
        if not self._send(("report", request, name, uid, event_type, info)):
            return None
        deadline = time.monotonic() + REPORT_SECONDS
        with self._replied:
            while request not in self._replies and time.monotonic() < deadline:
                self._replied.wait(deadline - time.monotonic())
            return self._replies.pop(request, None)  # type: ignore[no-any-return]

    def stop_runner(self, name: str, timeout: float) -> None:
        """Stop one destination's runner; the process exits after the last one."""
        deadline = time.monotonic() + timeout + 5.0
        self._send(("stop", name, timeout))
        with self._replied:
            while name in self._running and time.monotonic() < deadline:
                if self._process is None or self._process.poll() is not None:
                    break
                self._replied.wait(0.1)
            self._running.discard(name)
            last = not self._running
        if last:
            self._exit()

    def _exit(self) -> None:
        with self._replied:
            self._exiting = True
        self._send(("exit",))
        process = self._process
        if process is not None:
            try:
                process.wait(10.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._conn is not None:
            self._conn.close()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


class RemoteRunner(Runner):
    """A destination's runner in the sending process, as the main process sees it."""

    def __init__(self, process: SenderProcess, name: str) -> None:
        self.process = process
        self.name = name

    def start(self) -> None:
        """Started with the process."""

    def notify(self) -> None:
        self.process.notify(self.name)

    def stop(self, timeout: float = 30.0) -> None:
        self.process.stop_runner(self.name, timeout)

    def commitment_report(self, transaction_uid: str, event_type: int, info: Any) -> int | None:
        return self.process.commitment_report(self.name, transaction_uid, event_type, info)


def start_runners(config: Config, spool: Spool) -> dict[str, Runner]:
    """The destinations' runners: those that send, in a sending process of their own;
    the others (folder retries) here."""
    runners: dict[str, Runner] = {}
    sending = [name for name, dest in config.destinations.items() if type_of(dest).sends]
    for name, dest in config.destinations.items():
        if name not in sending:
            runners[name] = type_of(dest).runner(dest, spool)
            runners[name].start()
    if sending:
        process = SenderProcess(config, sending)
        process.start()
        runners.update({name: RemoteRunner(process, name) for name in sending})
    return runners


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


# ---------------------------------------------------------------------- the sending process


def main() -> None:
    """Entry point: ``python -m node.senders <socket fd> <node pid>``."""
    fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    conn = Connection(fd)
    config, names = pickle.loads(conn.recv_bytes())
    die_with_parent(parent_pid, SENDER_NICENESS)
    setup_logging(config)
    spool = Spool(config.node.spool)
    runners: dict[str, Runner] = {}
    for name in names:
        dest = config.destinations[name]
        runners[name] = type_of(dest).runner(dest, spool)
        runners[name].start()
    sending = threading.Lock()

    def reply(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send_bytes(pickle.dumps(message))

    reply(("ready",))
    _serve(conn, runners, reply)


def _serve(conn: Connection, runners: dict[str, Runner], reply: Any) -> None:
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            message = ("exit",)
        kind = message[0]
        if kind == "notify" and message[1] in runners:
            runners[message[1]].notify()
        elif kind == "report":
            _, request, name, uid, event_type, info = message
            runner = runners.get(name)
            reply(("status", request, runner and runner.commitment_report(uid, event_type, info)))
        elif kind == "stop":
            _, name, timeout = message
            runner = runners.pop(name, None)
            if runner is not None:  # in a thread: one black-holed peer holds up no other
                threading.Thread(target=_stop, args=(runner, name, timeout, reply)).start()
            else:
                reply(("stopped", name))
        elif kind == "exit":
            for name, runner in runners.items():
                _stop(runner, name, 5.0, lambda m: None)
            return


def _stop(runner: Runner, name: str, timeout: float, reply: Any) -> None:
    runner.stop(timeout)
    with contextlib.suppress(OSError):
        reply(("stopped", name))


def die_with_parent(parent_pid: int, niceness: int) -> None:
    """End with the node however it ends; leave signals to it; step back by ``niceness``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)


def setup_logging(config: Config) -> None:
    from node.cli import _setup_logging as setup

    setup(config.node.log_level, config.node.log_format)


if __name__ == "__main__":
    main()
