"""Feeds acknowledged instances from the spool to the worker processes.

The receive handler calls :meth:`Pipeline.submit` after an instance is durable; a
dispatcher thread hands each instance to a free worker through that worker's own
socket, and logs each outcome. A worker holds a few instances at once: the one it
compresses, the next one (sent ahead, so that it need not ask), and up to two before
them that its writer threads write out (see :class:`node.workers.Prepared`). Nothing
here decodes pixels: that happens in :mod:`node.workers`, in other processes.

Why not :class:`concurrent.futures.ProcessPoolExecutor`: its queues, locks and helper
threads cost CPU in this process for every task, taken from the thread that answers
C-STOREs, about ten times what a socket per worker costs (docs/decisions.md#d2). And a worker that dies takes with it only
the instance it compresses (the one it writes is done again), so the culprit of a
crash is known exactly. Workers are started with :mod:`subprocess`, see
:func:`node.workers.main`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from node.config import Config
from node.errors import StartupError
from node.outcome import Outcome, Status
from node.spool import Spool
from node.workers import DONE, FREE, READY, Reply, Task

log = logging.getLogger("dicom_node.pipeline")

# An instance that kills its worker this many times is quarantined.
MAX_CRASHES = 3
# Pause before trying again an instance whose processing hit an OSError (disk full).
RETRY_SECONDS = 10.0
# A worker imports pydicom, numpy and the codecs before it is ready.
START_SECONDS = 120.0
# Pause before starting a worker again after one failed to start.
RESTART_PAUSE_SECONDS = 5.0
# What a worker process runs; tests find workers by it.
WORKER_MAIN = "from node.workers import main; main()"
# What workers run per instance, by name: this process does not import it (nor the
# codecs it imports).
DEFAULT_TASK = "node.routing:prepare_incoming"


class WorkerStartError(StartupError):
    """A worker process did not start (it died or hung while importing)."""


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection
    # The incoming file it reads and compresses: the one to blame if it dies.
    compressing: Path | None = None
    # Those before, which its writer threads write out.
    writing: list[Path] = field(default_factory=list)
    # The next one, sent ahead: waiting in its socket, the worker starts on it as soon
    # as it is done compressing. (Sent only when asked, workers sat waiting for their
    # next job: docs/decisions.md#d3.)
    queued: Path | None = None

    @property
    def busy(self) -> bool:
        return bool(self.holds())

    def holds(self) -> list[Path]:
        return [p for p in (*self.writing, self.compressing, self.queued) if p is not None]

    def next_one(self) -> None:
        """It finished compressing: it starts on the queued one."""
        self.compressing, self.queued = self.queued, None


class Pipeline:
    """Worker processes fed from ``incoming/`` in arrival order, each compressing one
    instance at a time."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        on_outcome: Callable[[Outcome], None] | None = None,
        task: Task | str = DEFAULT_TASK,
    ) -> None:
        self.config = config
        self.spool = spool
        self._on_outcome = on_outcome
        self._task = task
        self._pending: deque[Path] = deque()
        self._workers: list[_Worker] = []
        self._crashes: dict[Path, int] = {}
        self._stopping = False
        self._config_blob: tuple[Config, bytes] | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        # submit() wakes the dispatcher, which sleeps on its workers' sockets, through this.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # One selector for the dispatcher's whole life: multiprocessing's wait() builds
        # and fills a new one on every call, twice per instance.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)

    def start(self) -> int:
        """Start the workers and the dispatcher; queue what a previous run left in ``incoming/``."""
        # Every worker starts now, so that the first instances do not wait for
        # interpreter start-up and codec imports.
        for _ in range(self.config.node.worker_count):
            worker = self._start_worker()
            self._workers.append(worker)  # stop() ends those started
            self._selector.register(worker.conn, selectors.EVENT_READ, worker)
        left_over = self.spool.list_incoming()
        with self._lock:
            self._pending.extend(left_over)
        self._thread.start()
        return len(left_over)

    def submit(self, path: Path) -> None:
        with self._lock:
            if self._stopping:
                return  # it stays in incoming/ for the next start
            self._pending.append(path)
            self._wake()

    def rescan(self) -> int:
        """Queue what is in ``incoming/`` and not known here: instances acknowledged by
        a receiving process that died before it told this one (node/receivers.py)."""
        with self._lock:
            known = set(self._pending)
            for worker in self._workers:
                known.update(worker.holds())
            found = [p for p in self.spool.list_incoming() if p not in known]
            if self._stopping or not found:
                return 0
            self._pending.extend(found)
            self._wake()
        return len(found)

    def reconfigure(self, config: Config) -> None:
        """Route instances not yet handed to a worker with ``config``."""
        self.config = config

    def backlog(self) -> int:
        with self._lock:
            return len(self._pending) + self._busy()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in flight (for tests and ``--once`` runs)."""
        with self._idle:
            return self._idle.wait_for(
                lambda: not self._pending and not self._busy(), timeout=timeout
            )

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what the workers hold; leave the rest in the spool for the next start."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._pending.clear()
            self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Whatever a worker still holds stays in incoming/ and is redone at next start.
            for worker in self._workers:
                for path in worker.holds():
                    log.warning("%s still in hand at shutdown; its worker is stopped", path.name)
                if worker.busy:
                    worker.process.kill()
            self._thread.join()
        for worker in self._workers:
            worker.conn.close()  # the worker's loop ends at EOF
        for worker in self._workers:
            try:
                worker.process.wait(5.0)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ----------------------------------------------------------------- internals

    def _busy(self) -> int:
        return sum(len(worker.holds()) for worker in self._workers)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
            os.write(self._wake_w, b"\0")

    def _start_worker(self) -> _Worker:
        # A new interpreter, not a fork: the network process runs threads, and a forked
        # child would inherit their locks in whatever state they were.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        task = (
            self._task
            if isinstance(self._task, str)
            else f"{self._task.__module__}:{self._task.__qualname__}"
        )
        command = [sys.executable, "-c", WORKER_MAIN, str(theirs.fileno()), str(os.getpid()), task]
        # The worker finds the modules this process found (a test's task, say).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with theirs:
            process = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env)
        conn = Connection(ours.detach())
        try:
            if not conn.poll(START_SECONDS) or conn.recv_bytes() != READY:
                raise WorkerStartError(f"a worker did not start within {START_SECONDS:.0f}s")
        except (EOFError, OSError) as exc:
            conn.close()
            raise WorkerStartError(
                f"a worker died while starting ({_exit_description(process, wait=5.0)})"
            ) from exc
        except WorkerStartError:
            conn.close()
            process.kill()
            process.wait()
            raise
        return _Worker(process, conn)

    def _job_message(self, path: Path) -> bytes:
        config = self.config
        if self._config_blob is None or self._config_blob[0] is not config:
            self._config_blob = (config, pickle.dumps(config))
        return pickle.dumps((self._config_blob[1], str(path)))

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._stopping and not self._busy():
                    return
                handed = self._hand_out()
            for worker, path in handed:
                self._send(worker, path)
            for key, _ in self._selector.select():
                worker = key.data
                if worker is None:
                    self._drain_wake_ups()
                    continue
                try:
                    self._collect(worker)
                except Exception:  # a bug here must not stop every later instance
                    log.exception("settling the instance of worker %s failed", worker.process.pid)

    def _hand_out(self) -> list[tuple[_Worker, Path]]:
        """Give pending instances to workers (under the lock); the caller sends them.

        Every worker gets one to compress before any gets one queued behind it.
        """
        handed: list[tuple[_Worker, Path]] = []
        if self._stopping:
            return handed
        for worker in self._workers:
            if worker.compressing is None and self._pending:
                worker.compressing = self._pending.popleft()
                handed.append((worker, worker.compressing))
        for worker in self._workers:
            if worker.compressing is not None and worker.queued is None and self._pending:
                worker.queued = self._pending.popleft()
                handed.append((worker, worker.queued))
        return handed

    def _send(self, worker: _Worker, path: Path) -> None:
        # If it died, its socket reads as EOF and _collect takes it from there.
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(self._job_message(path))

    def _drain_wake_ups(self) -> None:
        with contextlib.suppress(BlockingIOError):  # empty now
            while os.read(self._wake_r, 4096):
                pass

    def _collect(self, worker: _Worker) -> None:
        """Take one message of ``worker``: an instance moved on to its writer threads, an
        instance settled (its outcome or its error), or the worker's death."""
        try:
            message = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            self._worker_died(worker)
            return
        kind, path_text, *rest = message
        path = Path(path_text)
        if kind == FREE:
            with self._lock:
                if worker.compressing is not None:
                    worker.writing.append(worker.compressing)
                worker.next_one()
            return
        assert kind == DONE, message
        try:
            self._settle(path, rest[0])
        finally:
            with self._idle:
                if path in worker.writing:
                    worker.writing.remove(path)
                elif worker.compressing == path:  # settled without its writer threads
                    worker.next_one()
                self._idle.notify_all()

    def _settle(self, path: Path, reply: Reply) -> None:
        if reply.outcome is not None:
            self._crashes.pop(path, None)
            log_outcome(reply.outcome)
            if self._on_outcome:
                self._on_outcome(reply.outcome)
        elif reply.os_error:
            log.error(
                "%s: %s; it stays in incoming/, next try in %.0fs",
                path.name,
                reply.error,
                RETRY_SECONDS,
            )
            self._retry_later(path)
        else:
            log.error(
                "processing %s failed; it is kept in quarantine/\n%s", path.name, reply.traceback
            )
            self._keep_after_error(path, f"processing failed: {reply.error}")

    def _retry_later(self, path: Path) -> None:
        timer = threading.Timer(RETRY_SECONDS, self.submit, [path])
        timer.daemon = True
        timer.start()

    def _worker_died(self, worker: _Worker) -> None:
        """A worker died: start another; try its instances again, or give up on one.

        A worker compresses one instance at a time, and that is the one it died on
        (else the one it was writing out): a codec that crashes on one input costs that
        input a few tries, nobody else. The others it held are simply done again.
        """
        self._selector.unregister(worker.conn)
        worker.conn.close()
        how = _exit_description(worker.process, wait=1.0)
        replacement = None if self._stopping else self._replacement_worker()
        # If it was not compressing, whatever killed it struck while writing.
        writing = list(worker.writing)
        blamed = worker.compressing or (writing.pop(0) if writing else None)
        crashes = 0
        if blamed is None:
            log.error("a worker died while idle (%s); starting another", how)
        else:
            crashes = self._count_crash(blamed, how)
        for path in writing:
            log.warning("%s is handled again: its worker died while writing it", path.name)
        not_started = worker.queued
        with self._idle:
            worker.compressing = worker.queued = None
            worker.writing.clear()
            index = self._workers.index(worker)
            if replacement is None:
                del self._workers[index]  # shutting down: the instances wait in incoming/
            else:
                self._workers[index] = replacement
                self._selector.register(replacement.conn, selectors.EVENT_READ, replacement)
                if not_started is not None:
                    self._pending.appendleft(not_started)
                if blamed is not None and crashes < MAX_CRASHES:
                    self._pending.appendleft(blamed)
                self._pending.extendleft(reversed(writing))
            self._idle.notify_all()

    def _count_crash(self, path: Path, how: str) -> int:
        """One more worker death on ``path``; quarantine it at the last. The count so far."""
        crashes = self._crashes.get(path, 0) + 1
        self._crashes[path] = crashes
        if crashes >= MAX_CRASHES:
            self._crashes.pop(path, None)
            self._keep_after_error(path, f"a worker process died {crashes} times on it ({how})")
        else:
            log.error(
                "a worker died on %s (%s; %d of %d); trying again",
                path.name,
                how,
                crashes,
                MAX_CRASHES,
            )
        return crashes

    def _replacement_worker(self) -> _Worker:
        while True:
            try:
                return self._start_worker()
            except WorkerStartError as exc:
                log.error("%s; trying again in %.0fs", exc, RESTART_PAUSE_SECONDS)
                time.sleep(RESTART_PAUSE_SECONDS)

    def _keep_after_error(self, path: Path, reason: str) -> None:
        try:
            if path.exists():
                self.spool.keep_aside(path, self.spool.quarantine, reason)
                log.error("%s quarantined: %s", path.name, reason)
        except OSError as exc:
            log.error("could not quarantine %s (%s); it stays in incoming/", path.name, exc)


def _exit_description(process: subprocess.Popen[bytes], wait: float) -> str:
    try:
        code = process.wait(wait)
    except subprocess.TimeoutExpired:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def log_outcome(outcome: Outcome) -> None:
    if outcome.status == Status.UNROUTED:
        log.warning(
            "%s kept in unrouted/: %s", outcome.sop_instance_uid or outcome.incoming, outcome.reason
        )
        return
    if outcome.status == Status.QUARANTINED:
        log.error("%s quarantined: %s", outcome.incoming, outcome.reason)
        return
    if outcome.status == Status.GONE:
        return
    for error in outcome.errors:
        log.warning("%s: %s", outcome.sop_instance_uid, error)
    for note in outcome.notes:
        log.warning("%s: %s", outcome.sop_instance_uid, note)
    if outcome.reason:
        log.info(
            "%s not compressed (rule %s): %s",
            outcome.sop_instance_uid,
            outcome.rule,
            outcome.reason,
        )
    log.debug(
        "%s rule=%s ts=%s %d -> %d bytes in %.3fs delivered=%s queued=%s",
        outcome.sop_instance_uid,
        outcome.rule,
        outcome.transfer_syntax,
        outcome.bytes_in,
        outcome.bytes_out,
        outcome.seconds,
        ",".join(outcome.delivered),
        ",".join(outcome.queued),
    )
