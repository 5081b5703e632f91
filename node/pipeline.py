"""Feeds acknowledged instances from the spool to the worker processes.

The receive handler calls :meth:`Pipeline.submit` after an instance is durable; a
dispatcher thread keeps the worker pool busy and logs each outcome. Nothing here
decodes pixels: that happens in :mod:`node.workers`, in other processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from node.config import Config
from node.spool import Spool
from node.workers import Outcome, init_worker, process_incoming, warm_up

log = logging.getLogger("dicom_node.pipeline")

# An instance that kills its worker this many times, running alone, is quarantined.
MAX_CRASHES = 3
# Pause before trying again an instance whose processing hit an OSError (disk full).
RETRY_SECONDS = 10.0


# What the worker processes run per instance: (config, path) -> Outcome.
Task = Callable[[Config, str], Outcome]


@dataclass(frozen=True)
class _Job:
    path: Path
    # Run with nothing else in flight: a worker died while this instance was in flight,
    # and only a crash while it runs alone shows that it was the cause.
    alone: bool = False


@dataclass(frozen=True)
class _Running:
    path: Path
    executor: ProcessPoolExecutor
    alone: bool


class Pipeline:
    """A pool of worker processes fed from ``incoming/`` in arrival order."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        on_outcome: Callable[[Outcome], None] | None = None,
        task: Task = process_incoming,
    ) -> None:
        self.config = config
        self.spool = spool
        self._on_outcome = on_outcome
        self._task = task
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._slots = threading.Semaphore(2 * config.node.worker_count)
        self._in_flight: dict[Future[Outcome], _Running] = {}
        self._holding = False  # the dispatcher has taken a job it has not submitted yet
        self._settling = 0
        self._crashes: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._executor = self._new_executor()
        self._thread = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)

    def start(self) -> int:
        """Start dispatching; queue what a previous run left in ``incoming/``."""
        self._warm_up()
        left_over = self.spool.list_incoming()
        for path in left_over:
            self._queue.put(_Job(path))
        self._thread.start()
        return len(left_over)

    def submit(self, path: Path) -> None:
        self._queue.put(_Job(path))

    def reconfigure(self, config: Config) -> None:
        """Route instances not yet handed to a worker with ``config``."""
        self.config = config

    def backlog(self) -> int:
        with self._lock:
            return self._queue.qsize() + len(self._in_flight) + self._holding

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in flight (for tests and ``--once`` runs)."""
        with self._idle:
            return self._idle.wait_for(
                lambda: (
                    self._queue.empty()
                    and not self._in_flight
                    and not self._holding
                    and not self._settling
                ),
                timeout=timeout,
            )

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what the workers hold; leave the rest in the spool for the next start."""
        self._drain_queue()
        self._queue.put(None)
        self._thread.join(timeout)
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight, timeout=timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------- internals

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn, not fork: the network process runs threads, and a forked child would
        # inherit their locks in whatever state they were.
        return ProcessPoolExecutor(
            max_workers=self.config.node.worker_count,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(os.getpid(),),
        )

    def _replacement_executor(self) -> ProcessPoolExecutor:
        """A new pool after a worker died, its workers starting now, not on demand.

        Instances under suspicion run alone and would start one worker only; the
        others would then wait for interpreter start-up when the backlog resumes.
        """
        executor = self._new_executor()
        self._start_workers(executor)
        return executor

    def _start_workers(self, executor: ProcessPoolExecutor) -> list[Future[int]]:
        # The pool starts a worker only when a task finds none idle.
        return [executor.submit(warm_up) for _ in range(self.config.node.worker_count)]

    def _warm_up(self) -> None:
        # Start every worker now (the pool starts them on demand) so that the first
        # instances do not wait for interpreter start-up and codec imports.
        for future in self._start_workers(self._executor):
            future.result()

    def _drain_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._holding = True
            if job.alone:
                self._wait_until_nothing_in_flight()
            self._slots.acquire()
            with self._lock:
                try:
                    future = self._executor.submit(self._task, self.config, str(job.path))
                except BrokenProcessPool:
                    self._executor = self._replacement_executor()
                    future = self._executor.submit(self._task, self.config, str(job.path))
                self._in_flight[future] = _Running(job.path, self._executor, job.alone)
                self._holding = False
            future.add_done_callback(self._finished)
            if job.alone:
                self._wait_until_nothing_in_flight()

    def _wait_until_nothing_in_flight(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight)

    def _finished(self, future: Future[Outcome]) -> None:
        with self._lock:
            running = self._in_flight.pop(future)
            self._settling += 1  # out of flight, not yet requeued or reported
        path = running.path
        self._slots.release()
        try:
            outcome = future.result()
        except BrokenProcessPool:
            self._worker_died(running)
            outcome = None
        except OSError as exc:  # disk full, I/O error: the instance is fine, the disk is not
            log.error(
                "%s: %s; it stays in incoming/, next try in %.0fs", path.name, exc, RETRY_SECONDS
            )
            self._retry_later(path)
            outcome = None
        except Exception as exc:  # a bug in our code: keep the file, say so, go on
            log.exception("processing %s failed; it is kept in quarantine/", path.name)
            self._keep_after_error(path, f"processing failed: {type(exc).__name__}: {exc}")
            outcome = None
        if outcome is not None:
            self._crashes.pop(path, None)
            log_outcome(outcome)
            if self._on_outcome:
                self._on_outcome(outcome)
        with self._idle:
            self._settling -= 1
            self._idle.notify_all()  # wait_idle, and a dispatcher waiting to run one alone

    def _retry_later(self, path: Path) -> None:
        timer = threading.Timer(RETRY_SECONDS, self._queue.put, [_Job(path)])
        timer.daemon = True
        timer.start()

    def _worker_died(self, running: _Running) -> None:
        """A worker died: every instance in flight fails with it, and runs again alone.

        Only a death while an instance runs alone counts against it, so that an
        innocent instance that happened to be in flight next to a poisonous one is
        never quarantined.
        """
        with self._lock:
            # Every future of a broken pool fails; only the first replaces the pool.
            if running.executor is self._executor:
                running.executor.shutdown(wait=False, cancel_futures=False)
                self._executor = self._replacement_executor()
        path = running.path
        if not running.alone:
            log.warning("a worker died while %s was in flight; it runs again alone", path.name)
            self._queue.put(_Job(path, alone=True))
            return
        crashes = self._crashes.get(path, 0) + 1
        self._crashes[path] = crashes
        if crashes >= MAX_CRASHES:
            self._keep_after_error(path, f"a worker process died {crashes} times on it alone")
            return
        log.error("a worker died on %s alone (crash %d); trying again", path.name, crashes)
        self._queue.put(_Job(path, alone=True))

    def _keep_after_error(self, path: Path, reason: str) -> None:
        try:
            if path.exists():
                self.spool.keep_aside(path, self.spool.quarantine, reason)
                log.error("%s quarantined: %s", path.name, reason)
        except OSError as exc:
            log.error("could not quarantine %s (%s); it stays in incoming/", path.name, exc)


def log_outcome(outcome: Outcome) -> None:
    if outcome.status == "unrouted":
        log.warning(
            "%s kept in unrouted/: %s", outcome.sop_instance_uid or outcome.incoming, outcome.reason
        )
        return
    if outcome.status == "quarantined":
        log.error("%s quarantined: %s", outcome.incoming, outcome.reason)
        return
    if outcome.status == "gone":
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
