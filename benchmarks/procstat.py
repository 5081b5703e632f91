"""Memory and CPU of a process tree, read from /proc (psutil is used if installed).

The RSS sum counts pages shared between processes (libraries, fork copy-on-write) once per
process, so it overstates the real footprint of multi-process receivers; it is still the
number an operator sees in ``top`` and what a container limit is compared against.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

try:  # optional: not a project dependency
    import psutil
except ImportError:  # pragma: no cover - depends on the machine
    psutil = None

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids.extend(int(p) for p in (task / "children").read_text().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return kids


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            return [root, *(c.pid for c in proc.children(recursive=True))]
        except psutil.Error:
            return []
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` plus its waited-for children (cutime + cstime)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text.rsplit(")", 1)[1].split()  # the command name may contain spaces
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


def tree_rss(root: int) -> int:
    return sum(rss_bytes(pid) for pid in tree(root))


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by the trees below ``roots`` (live processes and reaped ones)."""
    return sum(cpu_seconds(pid) for root in roots for pid in tree(root))


class PeakMemory:
    """Samples the RSS sum of one or more process trees every ``interval`` s in a thread."""

    def __init__(self, roots: list[int], interval: float = 0.05) -> None:
        self.roots = roots
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(tree_rss(root) for root in self.roots))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self._sample()
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - started)))
