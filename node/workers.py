"""The worker processes: how they start, take jobs and answer the node (bootstrap and IPC).

A worker runs a task per instance, by default :func:`node.routing.prepare_incoming`
(match, compress, hand over), and reports what it did as an
:class:`~node.outcome.Outcome`; the main process does the logging. This module is
imported by the node's pipeline too, for the messages: it imports no codec.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from node.allocator import keep_large_buffers, release_free_memory
from node.codecs.base import reraise_unless_codec_failure
from node.config import Config
from node.outcome import Outcome

if TYPE_CHECKING:  # the names in _MOVED, below, for type checkers ("X as X": re-exported)
    from node.part10 import _raw_elements_reusable as _raw_elements_reusable
    from node.part10 import encode_part10 as encode_part10
    from node.part10 import part10_chunks as part10_chunks
    from node.routing import DEFER_BYTES as DEFER_BYTES
    from node.routing import prepare_incoming as prepare_incoming

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
WORKER_NICENESS = 15
READY = b"ready"
# After an instance this large a worker gives its freed memory back to the system.
LARGE_INSTANCE_BYTES = 16 * 1024 * 1024


@dataclass
class Reply:
    """A worker's answer to one job: the outcome, or the error that stopped it."""

    outcome: Outcome | None = None
    error: str | None = None
    os_error: bool = False  # disk full, I/O error: the instance is fine, the disk is not
    traceback: str = ""


@dataclass
class Prepared:
    """An instance routed and compressed, still to be written to its destinations.

    A worker's writer threads do this part (durable writes, links, fsyncs: mostly
    waiting for the disk) while the worker compresses the next instance.
    """

    outcome: Outcome
    write: Callable[[], None]
    started: float

    def finish(self) -> Outcome:
        self.write()
        self.outcome.seconds = time.perf_counter() - self.started
        return self.outcome


# What a worker runs per instance: (config, path of the incoming file) -> the outcome,
# or the prepared instance that gives it once written.
Task = Callable[[Config, str], "Outcome | Prepared"]
# A worker's messages to the node: (FREE, path): it may be sent the next instance while
# its writer threads write this one; (DONE, path, Reply): this one is settled.
FREE = "free"
DONE = "done"


def main() -> None:
    """Entry point of a worker process: ``<socket fd> <node pid> <module:task>``.

    The node starts its workers with :mod:`subprocess`, not :mod:`multiprocessing`,
    whose spawn method also starts a resource tracker process that the node has no
    use for (its memory: docs/decisions.md#d6).
    """
    fd, parent_pid, task_name = sys.argv[1:4]
    module, _, name = task_name.partition(":")
    task: Task = getattr(importlib.import_module(module), name)
    serve(Connection(int(fd)), task, int(parent_pid))


def serve(conn: Connection, task: Task, parent_pid: int) -> None:
    """A worker process's main loop: one job at a time from its socket, replies back.

    A job is ``(pickled config, path)``; the config is unpickled again only when it
    changed (a reload). The loop ends when the node closes its end.
    """
    init_worker(parent_pid)
    sending = threading.Lock()  # the main thread and the writer threads all reply

    def send(message: object) -> None:
        data = message if isinstance(message, bytes) else pickle.dumps(message)
        with sending:
            conn.send_bytes(data)

    send(READY)
    writer = _Writer(send)
    config: tuple[bytes, Config] | None = None
    try:
        while True:
            try:
                blob, path_text = pickle.loads(conn.recv_bytes())
            except EOFError:
                return
            if config is None or config[0] != blob:
                config = (blob, pickle.loads(blob))
            _handle(task, config[1], path_text, writer, send)
    finally:
        writer.close()


def _handle(
    task: Task, config: Config, path_text: str, writer: _Writer, send: Callable[[object], None]
) -> None:
    # A function of its own, so that nothing of this instance (data set, pixel data)
    # stays referenced while the next one is compressed.
    result = _run(task, config, path_text)
    if isinstance(result, Prepared):
        writer.take(path_text, result)
    else:
        send((DONE, path_text, result))


class _Writer:
    """The threads that write a worker's instances out.

    While they wait for fsyncs the worker compresses the next instance, so the core is
    not left idle. Two of them, because one instance's writing (two fsyncs, each a
    journal commit) took longer than compressing the next, and fsyncs from two threads
    share journal commits (docs/decisions.md#d4). Large instances are written alone, before the next one is
    taken, so a worker's memory stays that of about one of them.
    """

    THREADS = 2

    def __init__(self, send: Callable[[object], None]) -> None:
        self._send = send
        self._jobs: queue.Queue[tuple[str, Prepared] | None] = queue.Queue()
        self._free = threading.Semaphore(self.THREADS)
        self._threads = [
            threading.Thread(target=self._loop, name="writer", daemon=True)
            for _ in range(self.THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def take(self, path_text: str, prepared: Prepared) -> None:
        """Write ``prepared`` out; return once the worker may take the next instance."""
        if prepared.outcome.bytes_in >= LARGE_INSTANCE_BYTES:
            self._jobs.join()  # every instance before it is written
            self._free.acquire()
            self._jobs.put((path_text, prepared))
            self._jobs.join()
            return
        self._free.acquire()  # a writer is free for it
        # Said before a writer starts, so the node always hears FREE before DONE.
        self._send((FREE, path_text))
        self._jobs.put((path_text, prepared))

    def close(self) -> None:
        self._jobs.join()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            path_text, prepared = job
            del job  # the instance's memory goes with ``prepared``, below
            reply = _finish(prepared)
            del prepared
            self._send((DONE, path_text, reply))
            if reply.outcome is not None and reply.outcome.bytes_in >= LARGE_INSTANCE_BYTES:
                release_free_memory()
            self._free.release()
            self._jobs.task_done()
        self._jobs.task_done()


def _run(task: Task, config: Config, path_text: str) -> Reply | Prepared:
    try:
        result = task(config, path_text)
    except BaseException as exc:  # a Rust panic too: it costs one attempt, not the worker
        reraise_unless_codec_failure(exc)
        return _error_reply(exc)
    return result if isinstance(result, Prepared) else Reply(outcome=result)


def _finish(prepared: Prepared) -> Reply:
    try:
        return Reply(outcome=prepared.finish())
    except BaseException as exc:
        reraise_unless_codec_failure(exc)
        return _error_reply(exc)


def _error_reply(exc: BaseException) -> Reply:
    if isinstance(exc, OSError):  # disk full, I/O error: the instance is fine
        return Reply(error=str(exc), os_error=True)
    # A bug in our code: the node keeps the file and says so.
    return Reply(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def init_worker(parent_pid: int) -> None:
    """Worker initializer: die with the node, and yield the CPU to its receiving side.

    The worker must end when the node process ends, however it ends. Its pipe tells an
    idle worker, but a busy one would finish a large instance first, for nobody.
    (PDEATHSIG follows the thread that started the worker; the pipeline starts workers
    from its main and dispatcher threads, which live as long as the node.)
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: watch the parent instead
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the node died before prctl took effect
        os._exit(1)
    # Ctrl-C and a SIGTERM to the whole process group are for the node to handle: it
    # lets the workers finish the instance in hand, then stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Below the receiving process in the scheduler: on a busy machine the C-STORE
    # answers come first and the spool absorbs the compression backlog.
    os.nice(WORKER_NICENESS)  # also the lowest best-effort I/O priority
    run_only_on_idle_cpu()
    keep_large_buffers()


def run_only_on_idle_cpu() -> bool:
    """SCHED_IDLE: this process gets a CPU only when nothing else wants it.

    At nice 15 a worker still takes its slice from the thread answering C-STOREs and
    from the sender, which shows in the C-STORE response times; SCHED_IDLE keeps the
    compression rate (docs/decisions.md#d5). The price: on
    a machine that other programs keep fully busy, compression waits and the spool
    grows. False where the platform has no SCHED_IDLE (nice 15 stays).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


# Names that lived here before routing and the Part 10 writer got modules of their own
# (tests import them from here); imported on first use, so that the node's pipeline,
# which imports this module, does not load the codecs.
_MOVED = {
    "DEFER_BYTES": "node.routing",
    "prepare_incoming": "node.routing",
    "encode_part10": "node.part10",
    "part10_chunks": "node.part10",
    "_raw_elements_reusable": "node.part10",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
